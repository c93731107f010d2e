"""The champion-registration helper against a real `mlflow server` (the mlflow_sqlite_server fixture): the new
version carries the alias, its `.keras` file comes back through spam_mlops.registry and predicts like the
original, a second registration moves the alias, and MLflow's process-wide URIs are left as they were."""
from __future__ import annotations

import numpy as np
import pytest

from support import SPAM_TEXT, register_champion, train_champion

pytestmark = pytest.mark.integration

TEXTS = ["win a free prize now", "call me later at home", "claim your cash prize", "see you at dinner"]


def _tiny_model(seed: int):
    "A string-input Keras model (vectoriser → embedding → mean → sigmoid), as the serving contract wants."
    import keras
    import tensorflow as tf
    keras.utils.set_random_seed(seed)
    vec = keras.layers.TextVectorization(max_tokens=50, output_sequence_length=6)
    vec.adapt(tf.constant(TEXTS))
    inp = keras.Input(shape=(1,), dtype="string")
    x = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(50, 4)(vec(inp)))
    return keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(x))


def test_register_champion_on_a_real_server(mlflow_sqlite_server, tmp_path):
    import mlflow

    from spam_mlops import registry
    from spam_mlops.model import predict_texts
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    first, second = _tiny_model(0), _tiny_model(1)
    first.save(tmp_path / "first.keras")
    v1 = register_champion(mlflow_sqlite_server, tmp_path / "first.keras", "behaviour_test")  # from a file
    v2 = register_champion(mlflow_sqlite_server, second, "behaviour_test", alias="challenger")  # from a model
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before
    client = registry.client(mlflow_sqlite_server)
    assert (v1, v2) == ("1", "2")
    assert registry.alias_version(client, "behaviour_test").version == v1
    assert registry.alias_version(client, "behaviour_test", "challenger").version == v2
    loaded = registry.load_keras(client, "models:/behaviour_test@champion")
    np.testing.assert_allclose(predict_texts(loaded, TEXTS), predict_texts(first, TEXTS), atol=1e-6)
    assert np.abs(predict_texts(second, TEXTS) - predict_texts(first, TEXTS)).max() > 1e-4  # really another model
    v3 = register_champion(mlflow_sqlite_server, second, "behaviour_test")
    assert registry.alias_version(client, "behaviour_test").version == v3 == "3"


def test_train_champion_registers_a_servable_model(tmp_path):
    "The small champion of the serving tests: registered under its alias, a string-input model of probabilities."
    from spam_mlops import registry
    from spam_mlops.model import predict_texts
    settings, uri, version = train_champion(tmp_path, sample=500)
    assert uri == "models:/spam_detection@champion" and version == "1"
    model = registry.load_keras(registry.client(settings.mlflow_tracking_uri), uri)
    p = predict_texts(model, [SPAM_TEXT, "ok see you at home"])
    assert p.shape == (2,) and ((0 <= p) & (p <= 1)).all()
