"""A literate MLOps system for SMS spam detection: lakehouse, feature store, tracked and tuned LSTM training, Ray Serve API, monitoring and drift, on one machine or Kubernetes.

Modules:

- `spam_mlops.backup`: Back up and restore MLflow: a PostgreSQL dump plus a copy of the artifact store, with checksums.
- `spam_mlops.cli`: The `spam-mlops` command: one subcommand per stage, and `run` to execute a notebook under papermill.
- `spam_mlops.config`: One settings object, read from the environment (12-factor), shared by every stage.
- `spam_mlops.curate`: Clean the raw messages without losing the spam signal, drop exact duplicates, write `curated/`.
- `spam_mlops.drift`: Production window against the training baseline: feature, text and prediction drift, a report in the lake and MLflow, Prometheus metrics, accuracy from feedback, and a guarded retraining trigger.
- `spam_mlops.features`: Message features for the feature store, training and serving, from one vectorised function.
- `spam_mlops.ingest`: Fetch the SMS Spam Collection, validate every line, and write `raw/` with a manifest and `quarantine/`.
- `spam_mlops.lake`: One small I/O layer over the lakehouse: a local folder by default, `s3://bucket[/prefix]` on MinIO in production.
- `spam_mlops.tune`: Ray Tune with ASHA over the LSTM's hyperparameters: every trial runs train's shared loop, the search is tracked in MLflow, the winner goes through the registry gate."""

__version__ = "0.1.0"
