"""Shared fixtures: the corpus, a local lake with the pipeline run, a real S3 API server (moto), PostgreSQL
helpers and an MLflow tracking server on PostgreSQL with artifacts on S3."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import mlflow
import psycopg2
import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("SPAM_MLOPS_SOURCE", ROOT.parent / "shared" / "data" / "SMSSpamCollection")).resolve()


IN_CI = os.environ.get("CI", "").lower() == "true"


def require(path: str | None, name: str, hint: str) -> str:
    "A tool's path; when it is missing the test fails under CI=true (CI installs every tool) and skips elsewhere."
    if path: return path
    msg = f"{name} not found: {hint}"
    if IN_CI: pytest.fail(msg)
    pytest.skip(msg)


def free_port() -> int:
    "A TCP port nobody listens on right now."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30) -> None:
    "Wait until `url` answers, or fail."
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            requests.get(url, timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@pytest.fixture(scope="session")
def corpus() -> Path:
    "The SMS Spam Collection on disk (SPAM_MLOPS_SOURCE or ../shared/data)."
    if not CORPUS.is_file():
        pytest.fail(f"corpus not found at {CORPUS}: set SPAM_MLOPS_SOURCE")
    return CORPUS


@pytest.fixture(scope="session")
def s3_server():
    "A real S3 API server (moto's standalone server) on a free port; yields its endpoint URL."
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url, timeout=90)  # a loaded 2-core machine can take a while to import moto
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    "Environment pointing S3 clients at the test server with dummy credentials."
    for k, v in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(k, v)
    return s3_server


@pytest.fixture(scope="session")
def pipeline_lake(tmp_path_factory, corpus):
    "A local lake with ingest, curate and features run on the full corpus; yields its Settings."
    from spam_mlops.config import get_settings
    from spam_mlops.curate import curate
    from spam_mlops.features import features
    from spam_mlops.ingest import ingest

    settings = get_settings(lake=str(tmp_path_factory.mktemp("lake")), source=str(corpus))
    ingest(settings)
    curate(settings)
    features(settings)
    return settings


PG = dict(host="127.0.0.1", port=5432, user="postgres")


def pg_exec(sql: str, dbname: str = "postgres"):
    "Run one statement on the local PostgreSQL (trust auth), autocommit; return all rows if any."
    con = psycopg2.connect(dbname=dbname, **PG)
    con.autocommit = True
    try:
        with con.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description else None
    finally:
        con.close()


@pytest.fixture
def mlflow_pg_server(s3_env, tmp_path):
    """`mlflow server` on its own PostgreSQL database, artifacts proxied to a bucket on the moto S3 server.
    Yields (url, database URL, artifact root URI)."""
    db = f"spam_it_{uuid.uuid4().hex[:10]}"
    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1").create_bucket(Bucket=bucket)
    pg_exec(f"CREATE DATABASE {db}")
    port = free_port()
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_S3_ENDPOINT_URL": s3_env}
    db_url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db}"
    log = open(tmp_path / "mlflow-server.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--backend-store-uri", db_url,
                             "--artifacts-destination", f"s3://{bucket}/mlflow", "--workers", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout=90)
        yield url, db_url, f"s3://{bucket}/mlflow"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
        mlflow.set_tracking_uri(None)
        pg_exec(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
