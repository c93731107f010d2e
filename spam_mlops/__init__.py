"""A literate MLOps system for SMS spam detection: lakehouse, feature store, tracked and tuned LSTM training, Ray Serve API, monitoring and drift, on one machine or Kubernetes.

Modules:

- `spam_mlops.api`: The HTTP API over a `Service`: validation, the request and response models, two ASGI middlewares, the FastAPI app.
- `spam_mlops.backup`: Back up and restore MLflow: a PostgreSQL dump plus a copy of the artifact store, with checksums.
- `spam_mlops.cli`: The `spam-mlops` command: one subcommand per stage, and `run` to execute a notebook under papermill.
- `spam_mlops.config`: One settings object, read from the environment (12-factor), shared by every stage.
- `spam_mlops.curate`: Clean the raw messages without losing the spam signal, drop exact duplicates, add the new ones to `curated`.
- `spam_mlops.demo`: Stand-in data and models for demos and tests: SMS-like and foreign text, a demo LSTM, demo traffic.
- `spam_mlops.domain`: A classifier two-sample test: can a classifier tell the production window from the reference messages?
- `spam_mlops.drift`: The production window against the training baseline: drift tests, decision, report and metrics.
- `spam_mlops.feature_store`: Feast over the lake's message features: point-in-time training frames offline, low-latency reads online.
- `spam_mlops.features`: Message features for the feature store, training and serving, from one vectorised function.
- `spam_mlops.frame`: The training frame: curated corpus rows plus labelled predictions, with sources, table versions and a digest.
- `spam_mlops.ingest`: Validate a batch (a file, URL, s3:// object, or each new file of a landing prefix) and merge it into `raw`.
- `spam_mlops.lake`: One small I/O layer over the lakehouse: a local folder by default, `s3://bucket[/prefix]` on MinIO in production.
- `spam_mlops.model`: The seed notebook's LSTM: vectoriser, network, the loop Ray Train and Ray Tune share, metrics, the served model.
- `spam_mlops.predlog`: The API's logs: predictions and labelled feedback (one schema, the writer, the readers drift uses) and the audit.
- `spam_mlops.profile`: The baseline profile of a model's training data, stored with the model in MLflow.
- `spam_mlops.retrain`: What a drift alarm starts: one retraining at a time, locally or as a Kubernetes RayJob.
- `spam_mlops.serve`: The prediction API on Ray Serve: the deployment with dynamic batching, `serve run`, HTTPS and `spam-mlops serve`.
- `spam_mlops.service`: The API's state without HTTP or Ray: the compiled model and its refresh, the metrics, the prediction and audit logs.
- `spam_mlops.tables`: The lake's Delta tables: atomic commits, versions, history, upserts, compaction and a vacuum that keeps versions.
- `spam_mlops.train`: The LSTM trained on Ray Train, tracked in MLflow, scored beside a classical baseline, promoted through a gate.
- `spam_mlops.tune`: Ray Tune with ASHA over the LSTM's hyperparameters: each trial runs the shared loop, tracked in MLflow, winner gated."""

__version__ = "0.1.0"
