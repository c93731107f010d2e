"""The pytest plugin of the test suite (loaded by tests/conftest.py): the shared fixtures, built on
support.servers' ManagedServer, and the kind markers (a test under tests/<kind>/ gets the marker <kind>)."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from .data import corpus_path, pg_exec, pipeline_settings
from .servers import mlflow_server, moto_server

KINDS = ("unit", "data", "model", "integration", "deploy")  # the folders under tests/, one marker each


def pytest_collection_modifyitems(config, items):
    "Mark each test with the kind of the folder it is in (tests/model/... → model), beside its own markers."
    tests = Path(__file__).resolve().parents[1]
    for item in items:
        try: kind = Path(item.path).resolve().relative_to(tests).parts[0]
        except ValueError: continue
        if kind in KINDS: item.add_marker(kind)


@pytest.fixture(scope="session")
def corpus() -> Path:
    "The SMS Spam Collection on disk (SPAM_MLOPS_SOURCE or ../shared/data beside the checkout)."
    try: return corpus_path()
    except FileNotFoundError as e: pytest.fail(str(e))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    "A real S3 API server (moto's standalone server) on a free port; yields its endpoint URL."
    srv = moto_server(tmp_path_factory.mktemp("moto") / "moto.log")
    srv.start(timeout=90)  # a loaded 2-core machine can take a while to import moto
    try: yield srv.url
    finally: srv.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    "Environment pointing S3 clients at the test server with dummy credentials."
    for k, v in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(k, v)
    return s3_server


@pytest.fixture(scope="module")
def two_nodes():
    """A real multi-node Ray cluster on this machine for a test module: a 0-CPU head and two 1-CPU worker nodes,
    separate raylets with their own object stores (`cluster.LocalCluster`); a driver that joined it is
    disconnected before the nodes are stopped by pid."""
    from spam_mlops import cluster
    with cluster.LocalCluster(workers=(1, 1), object_store_mb=200) as c:
        yield c
        cluster.stop()


@pytest.fixture(scope="session")
def pipeline_lake(tmp_path_factory, corpus):
    "A local lake with ingest, curate and features run on the full corpus; yields its Settings."
    return pipeline_settings(tmp_path_factory.mktemp("lake"), corpus)


def _forget_tracking_uri():
    "Tests that talked to a server leave no MLflow URI behind for the next test."
    import mlflow
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


@pytest.fixture
def mlflow_sqlite_server(tmp_path):
    "`mlflow server` on a SQLite store in tmp, artifacts proxied to a folder beside it; yields its URL."
    srv = mlflow_server(tmp_path / "mlflow-server.log", f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts"))
    srv.start(timeout=120)
    try: yield srv.url
    finally:
        srv.stop()
        _forget_tracking_uri()


@pytest.fixture
def mlflow_pg_server(s3_env, tmp_path):
    """`mlflow server` on its own PostgreSQL database, artifacts proxied to a bucket on the moto S3 server.
    Yields (url, database URL, artifact root URI)."""
    import boto3
    db, bucket = f"spam_it_{uuid.uuid4().hex[:10]}", f"mlflow-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1").create_bucket(Bucket=bucket)
    pg_exec(f"CREATE DATABASE {db}")
    db_url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db}"
    srv = mlflow_server(tmp_path / "mlflow-server.log", db_url, f"s3://{bucket}/mlflow",
                        env={"MLFLOW_S3_ENDPOINT_URL": s3_env})
    try:
        srv.start(timeout=120)
        yield srv.url, db_url, f"s3://{bucket}/mlflow"
    finally:
        srv.stop()
        _forget_tracking_uri()
        pg_exec(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
