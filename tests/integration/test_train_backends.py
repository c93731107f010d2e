"""Training against the production backends: an MLflow server on PostgreSQL with artifacts on an S3 API (moto)."""
from __future__ import annotations

import shutil
from pathlib import Path

import boto3
import mlflow
import mlflow.tensorflow
import pandas as pd
import pytest

from spam_mlops.config import get_settings
from spam_mlops.feature_store import apply
from spam_mlops.profile import BASELINE_ARTIFACT
from spam_mlops.train import load_keras_model, predict_texts, train

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def test_train_register_and_load_through_server(pipeline_lake, mlflow_pg_server, s3_env, monkeypatch, tmp_path):
    url, _, artifacts = mlflow_pg_server
    bucket = artifacts[5:].split("/")[0]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    repo = tmp_path / "feature_repo"  # a private Feast repository (own registry), applied as `spam-mlops feast-apply`
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    s = get_settings(lake=pipeline_lake.lake, feature_repo=str(repo), online_store="sqlite")
    apply(s)
    assert s.mlflow_tracking_uri == url
    report = train(s, {"max_len": 24, "embedding_dim": 8, "lstm_units": 8, "epochs": 2}, sample_n=800, workers=0,
                   recall_floor=0.0)
    assert report.gate["decision"] == "promoted"

    client = mlflow.MlflowClient(url, url)
    run = client.get_run(report.run_id)
    assert run.info.status == "FINISHED" and "test_mcc" in run.data.metrics
    assert run.data.params["features_source"] == "feast"
    for k in ("loss", "accuracy", "val_loss", "val_accuracy"):  # logged live through the server, one point per epoch
        assert [m.step for m in client.get_metric_history(report.run_id, k)] == [h["epoch"] for h in report.history]
    baseline = mlflow.artifacts.load_dict(f"runs:/{report.run_id}/{BASELINE_ARTIFACT}")
    assert baseline["model"]["version"] == report.version
    assert str(client.get_model_version_by_alias(s.model_name, "champion").version) == report.version

    # the artifacts really are in the bucket, not on the local disk
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
            .list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.endswith(".keras") for k in keys) and any(k.endswith("vocabulary.txt") for k in keys)

    # load back by alias, as Keras and as pyfunc, and predict
    model = load_keras_model(f"models:/{s.model_name}@champion")
    texts = ["winner ! ! call xphone to claim xmoney now", "ok see you at home"]
    p = predict_texts(model, texts)
    pf = mlflow.pyfunc.load_model(f"models:/{s.model_name}@champion").predict(pd.DataFrame({"text": texts}))
    assert p.shape == (2,) and abs(p - pf).max() < 1e-5
    # and the Keras/TensorFlow flavour logged beside it, from the bucket
    flav = mlflow.tensorflow.load_model(run.data.tags["keras_model_uri"])
    assert abs(predict_texts(flav, texts) - p).max() < 1e-5
