"""Feast definitions of spam_mlops, for `feast apply` in this folder.

The objects are built by `spam_mlops.feature_store.definitions` (nbs/03_feature_store.ipynb), so the Feast CLI,
`spam-mlops feast-apply` and the notebooks register the very same entity, view and service:

- entity `message_id` (join key `message_id`, a string: 16 hex of blake2b of the message text)
- feature view `message_features`: every column of `spam_mlops.features.FEATURE_TYPES`, ttl 365 days, over the
  lake's features/nlp_features.parquet (SPAM_MLOPS_LAKE; s3:// lakes use AWS_ENDPOINT_URL and the AWS_* keys)
- feature service `spam_model_v1`: the features the model reads
"""

from pathlib import Path

from spam_mlops.config import get_settings
from spam_mlops.feature_store import definitions

_settings = get_settings()
if "lake" not in _settings.model_fields_set:  # SPAM_MLOPS_LAKE unset: the repository's ./lake, as `spam-mlops` uses
    _settings = get_settings(lake=str(Path(__file__).resolve().parents[1] / "lake"))  # when run from the root

message_id, nlp_features, message_features, spam_model_v1 = definitions(_settings)
