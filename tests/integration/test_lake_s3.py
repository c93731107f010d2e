"""The same stage code against a real S3 API server (moto standalone) writes the same objects as on disk."""
from __future__ import annotations

import boto3
import pytest
from support import free_port

from spam_mlops.config import get_settings
from spam_mlops.curate import CURATED, curate
from spam_mlops.features import FEATURES, features
from spam_mlops.ingest import MANIFEST, RAW_CSV, IngestError, ingest
from spam_mlops.lake import Lake, LakeError

pytestmark = pytest.mark.integration


def test_stages_on_s3_write_the_same_objects(s3_env, pipeline_lake, corpus):
    s3 = get_settings(lake="s3://spam-lake-test/prod", source=str(corpus))
    ingest(s3), curate(s3), features(s3)  # the bucket does not exist yet: created on first write
    on_s3, local = Lake.from_settings(s3), Lake.from_settings(pipeline_lake)
    assert on_s3.list("") == [CURATED, FEATURES, MANIFEST, RAW_CSV]
    assert on_s3.read_bytes(RAW_CSV) == local.read_bytes(RAW_CSV)
    for rel in (CURATED, FEATURES):
        a, b = on_s3.read_parquet(rel), local.read_parquet(rel)
        if "event_timestamp" in a:  # each lake records its own ingest time
            a, b = a.drop(columns="event_timestamp"), b.drop(columns="event_timestamp")
        assert a.equals(b)
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="spam-lake-test")["Contents"]}
    assert keys == {f"prod/{k}" for k in (CURATED, FEATURES, MANIFEST, RAW_CSV)}
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
    with pytest.raises(LakeError, match="s3://nowhere/raw"):
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
