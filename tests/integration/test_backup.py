"""Backup and restore of MLflow on the real PostgreSQL and the S3 test server: train and register, back up,
drop the database and the artifacts, restore; runs, versions, the champion alias and the model come back."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest
from support import pg_exec

from spam_mlops import registry
from spam_mlops.backup import BackupError, backup, latest_backup, restore
from spam_mlops.config import get_settings
from spam_mlops.lake import Lake
from spam_mlops.registry import RegistryError
from spam_mlops.train import predict_texts, train

pytestmark = pytest.mark.integration
TEXTS = ["WINNER!! claim your free prize now, call xphone", "ok see you at home later"]


def _runs(client, experiment: str) -> set[str]:
    return {r.info.run_id for r in client.search_runs([client.get_experiment_by_name(experiment).experiment_id])}


def test_backup_drop_restore(pipeline_lake, mlflow_pg_server, s3_env, monkeypatch, tmp_path):
    url, db_url, artifacts = mlflow_pg_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    s = get_settings(lake=pipeline_lake.lake)
    report = train(s, {"max_len": 24, "embedding_dim": 8, "lstm_units": 8, "epochs": 1}, sample_n=600, workers=0,
                   recall_floor=0.0, features_source="lake")  # the point is the backup, not Feast
    client, champion = registry.client(url), f"models:/{s.model_name}@champion"
    before = predict_texts(registry.load_keras(client, champion), TEXTS)
    runs_before = _runs(client, s.experiment)

    bk = backup(db_url, artifacts, "s3://spam-backups/mlflow", s)
    assert bk.files > 3 and latest_backup("s3://spam-backups/mlflow", s) == bk.location

    # disaster: the database and every artifact are gone
    db = db_url.rsplit("/", 1)[1]
    pg_exec(f"DROP DATABASE {db} WITH (FORCE)")
    bucket, prefix = artifacts[5:].split("/", 1)
    s3 = boto3.resource("s3")
    s3.Bucket(bucket).objects.filter(Prefix=prefix).delete()
    assert not list(s3.Bucket(bucket).objects.filter(Prefix=prefix))
    with monkeypatch.context() as m:  # the server answers 500 now: fail at once instead of minutes of backoff
        m.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        with pytest.raises(RegistryError, match="unreachable|no model at"):
            registry.load_keras(registry.client(url), champion)

    restore(bk.location, db_url, artifacts, s)
    runs_after = _runs(client, s.experiment)
    assert runs_after == runs_before and report.run_id in runs_after
    assert client.get_run(report.run_id).data.metrics["test_mcc"] == report.metrics["mcc"]
    assert client.get_model_version_by_alias(s.model_name, "champion").version == report.version
    after = predict_texts(registry.load_keras(client, champion), TEXTS)
    np.testing.assert_allclose(after, before, rtol=1e-6)


def test_tampered_backup_is_refused(tmp_path, pipeline_lake):
    lake = Lake.from_settings(get_settings(lake=str(tmp_path)))
    lake.write_bytes("b/mlflow.dump", b"x")
    lake.write_json("b/manifest.json", {"files": {"mlflow.dump": {"bytes": 1, "sha256": "f" * 64}}})
    with pytest.raises(BackupError, match="checksum mismatch"):
        restore(f"{tmp_path}/b", "postgresql://postgres@127.0.0.1:5432/never_created", f"{tmp_path}/a")


def _runs_dump(db: str, tmp_path: Path, rows: str) -> Path:
    "Database `db` given a `runs` table holding `rows` (SQL VALUES), and its pg_dump custom-format file."
    pg_exec("CREATE TABLE runs (id text primary key, mcc float)", db)
    pg_exec(f"INSERT INTO runs VALUES {rows}", db)
    dump = tmp_path / "mlflow.dump"
    url = f"postgresql://postgres@127.0.0.1:5432/{db}"
    subprocess.run([shutil.which("pg_dump"), "-Fc", "--no-owner", "-f", str(dump), url], check=True, timeout=120)
    return dump


def test_backup_from_a_dump_made_beforehand(tmp_path, pipeline_lake):
    """The CronJob's path: `pg_dump` runs elsewhere (the server's own image), `backup(dump_file=...)` takes its file;
    a drop and a restore bring the rows back. A file that is not a custom-format dump is refused."""
    db = f"spam_bk_{uuid.uuid4().hex[:10]}"
    url = f"postgresql://postgres@127.0.0.1:5432/{db}"
    pg_exec(f"CREATE DATABASE {db}")
    try:
        dump = _runs_dump(db, tmp_path, "('r1', 0.963), ('r2', 0.5)")
        (tmp_path / "artifacts" / "1").mkdir(parents=True)
        (tmp_path / "artifacts" / "1" / "model.keras").write_bytes(b"weights")
        s = get_settings(lake=str(tmp_path))
        bk = backup(url, str(tmp_path / "artifacts"), str(tmp_path / "backups"), s, dump_file=str(dump))
        assert bk.files == 2
        # the CronJob's command: everything from the environment, no pg_dump on the PATH
        env = os.environ | {"SPAM_MLOPS_BACKUP_DB": url, "SPAM_MLOPS_BACKUP_ARTIFACTS": str(tmp_path / "artifacts"),
                            "SPAM_MLOPS_BACKUP_DEST": str(tmp_path / "cron"), "SPAM_MLOPS_BACKUP_DUMP": str(dump),
                            "PATH": str(Path(sys.executable).parent)}
        out = subprocess.run([str(Path(sys.executable).parent / "spam-mlops"), "backup"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "backup: 2 files" in out.stdout
        assert latest_backup(str(tmp_path / "cron"), s).startswith(str(tmp_path / "cron"))
        del env["SPAM_MLOPS_BACKUP_DEST"]  # a missing setting is named with both ways to give it
        out = subprocess.run([str(Path(sys.executable).parent / "spam-mlops"), "backup"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and out.stderr.strip() == "error: give --dest or set SPAM_MLOPS_BACKUP_DEST"

        pg_exec(f"DROP DATABASE {db} WITH (FORCE)")
        shutil.rmtree(tmp_path / "artifacts")
        restore(bk.location, url, str(tmp_path / "artifacts"), s)
        assert sorted(pg_exec("SELECT id, mcc FROM runs", db)) == [("r1", 0.963), ("r2", 0.5)]
        assert (tmp_path / "artifacts" / "1" / "model.keras").read_bytes() == b"weights"

        (tmp_path / "not-a-dump.sql").write_text("CREATE TABLE x ();")
        with pytest.raises(BackupError, match="not a pg_dump custom-format file"):
            backup(url, str(tmp_path / "artifacts"), str(tmp_path / "backups"), s,
                   dump_file=str(tmp_path / "not-a-dump.sql"))
    finally:
        pg_exec(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def test_backup_goes_to_a_second_store_and_restores_from_it(s3_env, tmp_path):
    """Backups live elsewhere (issue 17, item 6): the CronJob's command writes to a second S3 server
    (SPAM_MLOPS_BACKUP_DEST_ENDPOINT), nothing lands on the store it protects, and `spam-mlops restore` brings the
    database and the artifacts back from the second store after both are lost. A destination in the lake's own
    bucket is refused with one line, unless forced."""
    import boto3
    from support import moto_server

    from spam_mlops.backup import BackupSettings
    second = moto_server(tmp_path / "moto-backups.log").start(timeout=90)
    db, lake = f"spam_bk2_{uuid.uuid4().hex[:10]}", f"lake-{uuid.uuid4().hex[:8]}"
    dest = f"backups-{uuid.uuid4().hex[:8]}"  # the shared moto may hold other tests' spam-backups bucket
    url = f"postgresql://postgres@127.0.0.1:5432/{db}"
    s3 = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    s3b = boto3.client("s3", endpoint_url=second.url, region_name="us-east-1", aws_access_key_id="backup",
                       aws_secret_access_key="backup-secret")
    s3.create_bucket(Bucket=lake)
    s3b.create_bucket(Bucket=dest)
    s3.put_object(Bucket=lake, Key="mlflow/1/models/m-1/artifacts/model.keras", Body=b"weights")
    pg_exec(f"CREATE DATABASE {db}")
    try:
        dump = _runs_dump(db, tmp_path, "('r1', 0.963)")
        s = get_settings(lake=f"s3://{lake}")
        with pytest.raises(BackupError, match=f"in bucket {lake} of the store it protects"):
            backup(url, f"s3://{lake}/mlflow", f"s3://{lake}/backups", s, dump_file=str(dump), target=BackupSettings())
        forced = backup(url, f"s3://{lake}/mlflow", f"s3://{lake}/backups", s, dump_file=str(dump),
                        target=BackupSettings(allow_same_store=True))
        assert forced.location.startswith(f"s3://{lake}/backups/")

        cli = [str(Path(sys.executable).parent / "spam-mlops")]
        env = os.environ | {"SPAM_MLOPS_LAKE": f"s3://{lake}", "SPAM_MLOPS_BACKUP_DB": url,
                            "SPAM_MLOPS_BACKUP_ARTIFACTS": f"s3://{lake}/mlflow", "SPAM_MLOPS_BACKUP_DUMP": str(dump),
                            "SPAM_MLOPS_BACKUP_DEST": f"s3://{dest}/mlflow",
                            "SPAM_MLOPS_BACKUP_DEST_ENDPOINT": second.url,
                            "SPAM_MLOPS_BACKUP_DEST_ACCESS_KEY_ID": "backup",
                            "SPAM_MLOPS_BACKUP_DEST_SECRET_ACCESS_KEY": "backup-secret"}
        out = subprocess.run([*cli, "backup"], env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        assert "backup: 2 files" in out.stdout and f"s3://{dest}/mlflow/" in out.stdout, out.stdout
        on_second = [o["Key"] for o in s3b.list_objects_v2(Bucket=dest)["Contents"]]
        assert any(k.endswith("/manifest.json") for k in on_second) and any(k.endswith("model.keras")
                                                                            for k in on_second), on_second
        assert dest not in {b["Name"] for b in s3.list_buckets()["Buckets"]}  # nothing on the lake's store

        # disaster: the database and the artifact store are gone; restore from the second store
        pg_exec(f"DROP DATABASE {db} WITH (FORCE)")
        boto3.resource("s3", endpoint_url=s3_env, region_name="us-east-1").Bucket(lake).objects.all().delete()
        out = subprocess.run([*cli, "restore"], env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        assert pg_exec("SELECT id, mcc FROM runs", db) == [("r1", 0.963)]
        got = s3.get_object(Bucket=lake, Key="mlflow/1/models/m-1/artifacts/model.keras")["Body"].read()
        assert got == b"weights"

        # the CronJob's command refuses the lake's own bucket in one line
        out = subprocess.run([*cli, "backup"], env=env | {"SPAM_MLOPS_BACKUP_DEST": f"s3://{lake}/backups",
                                                          "SPAM_MLOPS_BACKUP_DEST_ENDPOINT": ""},
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 1 and out.stderr.strip().startswith(f"error: backup destination s3://{lake}/backups")
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    finally:
        second.stop()
        pg_exec(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
