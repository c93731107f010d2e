"""Training against the production backends: an MLflow server on PostgreSQL with artifacts on an S3 API (moto)."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import mlflow
import pandas as pd
import psycopg2
import pytest
from conftest import free_port, wait_http

from spam_mlops.config import get_settings
from spam_mlops.train import load_keras_model, predict_texts, train

pytestmark = pytest.mark.integration
PG = dict(host="127.0.0.1", port=5432, user="postgres")


def _pg(sql: str):
    con = psycopg2.connect(dbname="postgres", **PG)
    con.autocommit = True
    try:
        with con.cursor() as cur: cur.execute(sql)
    finally: con.close()


@pytest.fixture
def mlflow_server(s3_env, tmp_path):
    "`mlflow server` on its own PostgreSQL database, artifacts proxied to a bucket on the moto S3 server."
    db = f"spam_train_{uuid.uuid4().hex[:10]}"
    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1").create_bucket(Bucket=bucket)
    _pg(f"CREATE DATABASE {db}")
    port = free_port()
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_S3_ENDPOINT_URL": s3_env}
    log = open(tmp_path / "mlflow-server.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db}",
                             "--artifacts-destination", f"s3://{bucket}/mlflow", "--workers", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout=90)
        yield url, bucket
    finally:
        proc.terminate()
        try: proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
        mlflow.set_tracking_uri(None)
        _pg(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def test_train_register_and_load_through_server(pipeline_lake, mlflow_server, s3_env, monkeypatch):
    url, bucket = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    s = get_settings(lake=pipeline_lake.lake)
    assert s.mlflow_tracking_uri == url
    report = train(s, {"max_len": 24, "embedding_dim": 8, "lstm_units": 8, "epochs": 2}, sample_n=800, workers=0,
                   recall_floor=0.0)
    assert report.gate["decision"] == "promoted"

    client = mlflow.MlflowClient(url, url)
    run = client.get_run(report.run_id)
    assert run.info.status == "FINISHED" and "test_mcc" in run.data.metrics
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
