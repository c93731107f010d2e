"""The same stage code against a real S3 API server (moto standalone) writes the same objects as on disk."""
from __future__ import annotations

import boto3
import pytest
from support import free_port

from spam_mlops.config import get_settings
from spam_mlops.curate import CURATED_TABLE, curate, read_curated
from spam_mlops.features import FEATURES, FEATURES_MANIFEST, features, read_features
from spam_mlops.ingest import BATCHES_TABLE, MANIFEST, RAW_TABLE, IngestError, ingest, read_raw
from spam_mlops.lake import Lake
from spam_mlops.tables import TableError

pytestmark = pytest.mark.integration


def test_stages_on_s3_write_the_same_tables(s3_env, pipeline_lake, corpus, monkeypatch):
    monkeypatch.setenv("SPAM_MLOPS_S3_ALLOW_HTTP", "true")  # moto speaks plain HTTP; delta-rs refuses it by default
    s3 = get_settings(lake="s3://spam-lake-test/prod", source=str(corpus))
    ingest(s3), curate(s3), features(s3)  # the bucket does not exist yet: created on first write
    on_s3, local = Lake.from_settings(s3), Lake.from_settings(pipeline_lake)
    assert [p for p in on_s3.list("") if not p.startswith("tables/")] == [FEATURES_MANIFEST, FEATURES, MANIFEST]
    assert {p.split("/")[1] for p in on_s3.list("tables")} == {RAW_TABLE, BATCHES_TABLE, CURATED_TABLE}
    stamps = ["ingested_at", "curated_at", "event_timestamp"]  # each lake records its own times
    for a, b in [(read_raw(on_s3, settings=s3), read_raw(local)),
                 (read_curated(on_s3, settings=s3), read_curated(local)),
                 (read_features(on_s3), read_features(local))]:
        a, b = (x.drop(columns=[c for c in stamps if c in x]).sort_values("message_id", ignore_index=True)
                for x in (a, b))
        assert a.drop(columns="source", errors="ignore").equals(b.drop(columns="source", errors="ignore"))
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="spam-lake-test")["Contents"]}
    assert {k for k in keys if "/tables/" not in k} == {f"prod/{k}" for k in (FEATURES, FEATURES_MANIFEST, MANIFEST)}
    assert ingest(s3).unchanged


def test_source_from_s3(s3_env, tmp_path, corpus):
    boto3.client("s3").create_bucket(Bucket="spam-source")
    boto3.client("s3").upload_file(str(corpus), "spam-source", "in/SMSSpamCollection")
    r = ingest(get_settings(lake=str(tmp_path), source="s3://spam-source/in/SMSSpamCollection"))
    assert r.rows_accepted == 5574
    with pytest.raises(IngestError, match="cannot read s3://spam-source/in/missing"):
        ingest(get_settings(lake=str(tmp_path / "x"), source="s3://spam-source/in/missing"))


def test_unreachable_s3_is_a_clear_error(monkeypatch, corpus):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("SPAM_MLOPS_S3_ALLOW_HTTP", "true")
    with pytest.raises(TableError, match="s3://nowhere/tables/batches"):  # the first lake access: is it known?
        ingest(get_settings(lake="s3://nowhere", source=str(corpus)))


def test_a_bucket_wiped_after_the_first_write_is_created_again(s3_env):
    "A lake object outlives its bucket (a wiped or rebuilt store): the next write creates the bucket again."
    lake = Lake.from_settings(get_settings(lake="s3://spam-wiped/prod"))
    lake.write_json("a.json", {"n": 1})
    bucket = boto3.resource("s3").Bucket("spam-wiped")
    bucket.objects.all().delete()
    bucket.delete()
    assert "spam-wiped" not in {b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]}
    lake.write_json("b.json", {"n": 2})
    assert lake.list("") == ["b.json"] and lake.read_json("b.json") == {"n": 2}
