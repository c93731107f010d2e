"""New data, incrementally: a later batch adds only its new rows to raw, curated and the features Parquet; the same
bytes again change nothing; a landing prefix takes each file once; curate, features and materialize rerun with
nothing new do nothing; a later batch's rows carry later event times and reach Feast's online store. On a local
lake and on a real S3 API server (moto)."""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pandas as pd
import pytest

from spam_mlops.config import get_settings
from spam_mlops.curate import CURATED_TABLE, curate, read_curated
from spam_mlops.features import FEATURES_MANIFEST, features, read_features
from spam_mlops.ingest import BATCHES_TABLE, QUARANTINE, RAW_COLUMNS, RAW_TABLE, batch_id, ingest, message_id, read_raw
from spam_mlops.lake import Lake
from spam_mlops.tables import Table

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "spam-mlops")

FIRST = "ham\tOk lar... Joking wif u oni\nspam\tWINNER!! Call 09061701461 to claim £900\nham\tsee you at 5?\n"
# one repeat (Ok lar), one conflict (see you at 5? now spam), two new messages
SECOND = ("ham\tOk lar... Joking wif u oni\nspam\tsee you at 5?\nham\tsorry, running late\n"
          "spam\tFREE entry: txt WIN to 80086 now!\n")


def _versions(lake: Lake, settings) -> dict:
    return {t: Table(lake, t, settings).version() for t in (RAW_TABLE, BATCHES_TABLE, CURATED_TABLE)}


def _second_batch_adds_only_new_rows(settings, put):
    "The whole flow on one lake; `put(name, text)` stores a source file and returns its URI."
    lake = Lake.from_settings(settings)
    a = ingest(settings, put("a.txt", FIRST))
    c1, f1 = curate(settings), features(settings)
    assert (a.rows_new, c1.rows_out, f1.rows_new) == (3, 3, 3)
    # the same bytes again, under another name too: nothing changes
    before = _versions(lake, settings)
    again = [ingest(settings, put(name, FIRST)) for name in ("a.txt", "a-copy.txt")]
    assert all(r.unchanged and r.batch_id == a.batch_id for r in again) and _versions(lake, settings) == before
    assert curate(settings).rows_in == 0 and features(settings).rows_new == 0
    assert "0 new rows" in str(curate(settings)) and "0 new rows" in str(features(settings))
    assert _versions(lake, settings) == before
    b = ingest(settings, put("b.txt", SECOND))
    assert (b.rows_read, b.rows_accepted, b.rows_refused, b.rows_new) == (4, 3, 1, 2)
    assert b.raw_version == a.raw_version + 1
    q = pd.read_csv(io.BytesIO(lake.read_bytes(f"{QUARANTINE}/{b.batch_id}.refused.csv")))
    assert q.line.tolist() == [2] and q.reason[0] == f"label conflict: the same text is ham in batch {a.batch_id}"
    raw = read_raw(lake, settings=settings)
    assert list(raw.columns) == RAW_COLUMNS and len(raw) == 5 and raw.message_id.is_unique
    assert raw.set_index("text").batch_id["Ok lar... Joking wif u oni"] == a.batch_id  # keeps its first batch
    assert raw[raw.batch_id == b.batch_id].text.tolist() == ["sorry, running late", "FREE entry: txt WIN to 80086 now!"]
    c2 = curate(settings)
    assert (c2.rows_in, c2.rows_out, c2.raw_version) == (2, 2, b.raw_version)
    f2 = features(settings)
    assert (f2.rows_new, f2.rows, f2.curated_version) == (2, 5, c2.curated_version)
    assert lake.read_json(FEATURES_MANIFEST)["curated_version"] == c2.curated_version
    cur, feat = read_curated(lake, settings=settings), read_features(lake)
    assert feat.message_id.tolist() == cur.message_id.tolist()  # old rows first, then the new ones
    by_batch = feat.merge(cur[["message_id", "batch_id"]]).groupby("batch_id").event_timestamp
    assert by_batch.min()[b.batch_id] > by_batch.max()[a.batch_id]  # a later batch has later event times
    assert len(read_curated(lake, version=c1.curated_version, settings=settings)) == 3  # time travel
    hist = Table(lake, CURATED_TABLE, settings).history()
    assert [m.get("raw_version") for m in hist.meta] == [a.raw_version, b.raw_version]
    batches = Table(lake, BATCHES_TABLE, settings).read().sort_values("raw_version")
    assert batches.batch_id.tolist() == [a.batch_id, b.batch_id] and batches.rows_new.tolist() == [3, 2]
    return lake


def _landing_takes_each_file_once(settings, put, prefix):
    "Two files taken once each; a third added later is taken by the next run, and only it."
    put("landing/01.txt", "ham\tfirst landing file\n")
    put("landing/02.txt", "spam\tsecond landing file: WIN £100\n")
    put("landing/.03.txt.part", "ham\tunfinished upload\n")
    one = ingest(settings, prefix)
    assert [b.rows_new for b in one.batches] == [1, 1] and one.skipped == 0
    assert [b.source for b in one.batches] == [f"{prefix}01.txt", f"{prefix}02.txt"]
    two = ingest(settings, prefix)
    assert two.batches == [] and two.skipped == 2 and "0 new rows" in str(two)
    put("landing/03.txt", "ham\tthird landing file\nham\tfirst landing file\n")
    three = ingest(settings, prefix)
    assert [b.source for b in three.batches] == [f"{prefix}03.txt"] and three.skipped == 2
    assert three.batches[0].rows_new == 1
    assert set(Table(Lake.from_settings(settings), BATCHES_TABLE, settings).read().source) == \
        {f"{prefix}0{i}.txt" for i in (1, 2, 3)}


def _local_put(root: Path):
    def put(name: str, text: str) -> str:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        return str(p)
    return put


def test_second_batch_on_a_local_lake(tmp_path):
    _second_batch_adds_only_new_rows(get_settings(lake=str(tmp_path / "lake")), _local_put(tmp_path / "in"))


def test_landing_folder(tmp_path):
    settings = get_settings(lake=str(tmp_path / "lake"))
    _landing_takes_each_file_once(settings, _local_put(tmp_path), f"{tmp_path}/landing/")


@pytest.fixture
def s3(s3_env, monkeypatch):
    "Settings of a lake on the moto S3 server (plain HTTP allowed), and a `put` into a source bucket."
    monkeypatch.setenv("SPAM_MLOPS_S3_ALLOW_HTTP", "true")
    client = boto3.client("s3")
    bucket = f"spam-in-{os.urandom(4).hex()}"
    client.create_bucket(Bucket=bucket)

    def put(name: str, text: str) -> str:
        client.put_object(Bucket=bucket, Key=name, Body=text.encode())
        return f"s3://{bucket}/{name}"
    return get_settings(lake=f"s3://spam-lake-{os.urandom(4).hex()}/prod", s3_allow_http=True), put, bucket


def test_second_batch_on_s3(s3):
    settings, put, _ = s3
    lake = _second_batch_adds_only_new_rows(settings, put)
    assert lake.exists("features/nlp_features.parquet") and lake.list("tables/raw/_delta_log")


def test_landing_prefix_on_s3(s3):
    settings, put, bucket = s3
    _landing_takes_each_file_once(settings, put, f"s3://{bucket}/landing/")


def test_a_batch_interrupted_before_its_batches_row_is_completed(tmp_path):
    "Killed between the raw commit and the batches commit: the rerun records the batch with its rows as new."
    settings = get_settings(lake=str(tmp_path / "lake"))
    src = _local_put(tmp_path)("a.txt", FIRST)
    data = Path(src).read_bytes()
    bid = batch_id(hashlib.sha256(data).hexdigest())
    texts = [line.split("\t")[1] for line in FIRST.splitlines()[:2]]
    rows = pd.DataFrame({"message_id": [message_id(t) for t in texts], "label": ["ham", "spam"], "text": texts,
                         "batch_id": bid, "source": src, "line": [1, 2],
                         "ingested_at": pd.Timestamp.now(tz="UTC")})
    Table(Lake.from_settings(settings), RAW_TABLE, settings).merge(rows)  # what the killed run had committed
    r = ingest(settings, src)
    assert (r.rows_new, r.raw_version) == (3, 1)
    assert Table(Lake.from_settings(settings), BATCHES_TABLE, settings).read().rows_new.tolist() == [3]


def test_cli_ingests_a_landing_folder(tmp_path):
    put = _local_put(tmp_path)
    put("landing/a.txt", FIRST)
    put("landing/b.txt", SECOND)
    env = {**os.environ, "SPAM_MLOPS_LAKE": str(tmp_path / "lake")}
    r = subprocess.run([CLI, "ingest", str(tmp_path / "landing")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "2 new file(s), 0 already taken, 0 failed; 5 new rows" in r.stdout
    r = subprocess.run([CLI, "ingest", str(tmp_path / "landing")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and "0 new file(s), 2 already taken" in r.stdout


def test_feast_reads_a_second_batch_message_after_materialize(tmp_path):
    "Incremental materialize takes the later batch's rows (their event time is their arrival), and only them."
    from spam_mlops.feature_store import apply, materialize, online_features
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    settings = get_settings(lake=str(tmp_path / "lake"), feature_repo=str(repo), online_store="sqlite")
    put = _local_put(tmp_path)
    for stage in (lambda: ingest(settings, put("a.txt", FIRST)), lambda: curate(settings), lambda: features(settings)):
        stage()
    apply(settings)
    assert materialize(settings).rows == 3
    time.sleep(1.1)  # materialize's window ends at a whole second: the next rows arrive after this run's end
    for stage in (lambda: ingest(settings, put("b.txt", SECOND)), lambda: curate(settings), lambda: features(settings)):
        stage()
    time.sleep(1.1)
    m = materialize(settings)
    assert m.rows == 2 and m.incremental
    assert materialize(settings).rows == 0
    late = message_id("FREE entry: txt WIN to 80086 now!")
    on = online_features(settings, [late, message_id("never seen")])
    assert on.exclamation_count.tolist()[0] == 1 and on.iloc[1, 1:].isna().all()
