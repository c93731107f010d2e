"""The first three stages end to end on a local lake (the UCI corpus as the first batch), and every kind of bad input
the ingest issue lists. Later batches, landing prefixes and S3: tests/data/test_incremental.py."""
from __future__ import annotations

import hashlib
import http.server
import io
import os
import threading
import zipfile
from functools import partial

import pandas as pd
import pytest

from spam_mlops.config import ConfigError, get_settings
from spam_mlops.curate import CURATED, CURATED_COLUMNS, read_curated
from spam_mlops.features import FEATURE_TYPES, FEATURES, FEATURES_MANIFEST, compute_features, read_features
from spam_mlops.ingest import (
    BATCHES_TABLE,
    MANIFEST,
    QUARANTINE,
    RAW_COLUMNS,
    RAW_TABLE,
    IngestError,
    batch_id,
    ingest,
    message_id,
    read_raw,
)
from spam_mlops.lake import Lake, LakeError
from spam_mlops.tables import Table, TableError


def test_pipeline_counts(pipeline_lake, corpus):
    lake = Lake.from_settings(pipeline_lake)
    raw, cur, feat = read_raw(lake), read_curated(lake), read_features(lake)
    # raw holds each message once (the 403 repeated lines add nothing): 5171 messages
    assert len(raw) == 5171 and raw.label.value_counts().to_dict() == {"ham": 4518, "spam": 653}
    assert list(raw.columns) == RAW_COLUMNS and raw.message_id.is_unique
    assert len(cur) == 5171 and cur.message_id.is_unique
    assert list(cur.columns) == CURATED_COLUMNS
    assert len(feat) == len(cur) and set(feat.message_id) == set(cur.message_id)
    assert list(feat.columns) == ["message_id", "event_timestamp", *FEATURE_TYPES]
    sha = hashlib.sha256(corpus.read_bytes()).hexdigest()
    (batch,) = Table(lake, BATCHES_TABLE, pipeline_lake).read().itertuples()
    assert (batch.batch_id, batch.source_sha256, batch.source) == (batch_id(sha), sha, str(corpus))
    assert (batch.rows_read, batch.rows_accepted, batch.rows_refused, batch.rows_new, batch.raw_version) == \
        (5574, 5574, 0, 5171, 0)
    assert set(raw.batch_id) == set(cur.batch_id) == {batch.batch_id}
    assert lake.read_json(MANIFEST)["source_sha256"] == sha
    assert lake.read_json(FEATURES_MANIFEST)["curated_version"] == Table(lake, "curated", pipeline_lake).version()
    assert (feat.event_timestamp.to_numpy() == cur.set_index("message_id").curated_at[feat.message_id].to_numpy()).all()
    assert lake.list(QUARANTINE) == []


def test_raw_roundtrip_keeps_every_text(pipeline_lake, corpus):
    "Quoting off: no line is merged or altered on the way into raw; each message keeps its first line."
    first: dict[str, int] = {}
    for n, line in enumerate(corpus.read_text("utf-8").splitlines(), start=1):
        first.setdefault(line.split("\t", 1)[1], n)
    raw = read_raw(Lake.from_settings(pipeline_lake))
    assert raw.text.tolist() == list(first) and raw.line.tolist() == list(first.values())
    assert raw.message_id.tolist() == [message_id(t) for t in first]


def test_features_match_single_message_path(pipeline_lake):
    "Serving's one-message path gives exactly the stored batch features."
    lake = Lake.from_settings(pipeline_lake)
    cur, feat = read_curated(lake).head(50), read_features(lake).head(50)
    single = pd.DataFrame([compute_features(pd.Series([t])).iloc[0] for t in cur.text]).reset_index(drop=True)
    pd.testing.assert_frame_equal(single.astype(FEATURE_TYPES), feat[list(FEATURE_TYPES)], check_dtype=False)


@pytest.mark.parametrize("store", ["object", "string[pyarrow]", "large_string", "string_view"])
def test_cleaning_and_features_do_not_depend_on_how_the_texts_are_stored(pipeline_lake, store):
    """Ray Data hands batches over with Arrow-backed, chunked columns: the cleaning and the features are the same
    for every way a frame can hold its texts."""
    import pyarrow as pa

    from spam_mlops.curate import clean_text
    texts = read_curated(Lake.from_settings(pipeline_lake)).text.head(3000)
    assert texts.str.contains("&").any()  # the entity path (_unescape) is taken
    if store in ("object", "string[pyarrow]"): other = texts.astype(store)
    else:
        halves = [texts.iloc[:1500].tolist(), texts.iloc[1500:].tolist()]
        other = pd.Series(pd.arrays.ArrowExtensionArray(pa.chunked_array(halves, getattr(pa, store)())),
                          index=texts.index)
    assert clean_text(other).tolist() == clean_text(texts.astype(object)).tolist()
    pd.testing.assert_frame_equal(compute_features(other), compute_features(texts.astype(object)))


def test_rerun_is_idempotent(pipeline_lake):
    lake = Lake.from_settings(pipeline_lake)
    versions = {t: Table(lake, t, pipeline_lake).version() for t in (RAW_TABLE, BATCHES_TABLE)}
    before = lake.read_bytes(MANIFEST)
    r = ingest(pipeline_lake)
    assert r.unchanged and str(r).startswith("ingest: 0 new rows")
    assert {t: Table(lake, t, pipeline_lake).version() for t in versions} == versions
    assert lake.read_bytes(MANIFEST) == before


def _settings(tmp_path, data: bytes, **kw):
    src = tmp_path / "corpus.txt"
    src.write_bytes(data)
    return get_settings(lake=str(tmp_path / "lake"), source=str(src), **kw)


@pytest.mark.parametrize("line,reason", [
    (b"ham\tok\textra", "found 3"), (b"hamok", "found 1"), (b"maybe\thi", "unknown label"),
    (b"spam\t   ", "empty text"), (b"ham\tcaf\xe9", "not UTF-8"),
])
def test_bad_lines_are_quarantined_with_reason(tmp_path, line, reason):
    s = _settings(tmp_path, b"ham\tfine\n" + line + b"\nspam\tWIN now\n")
    r = ingest(s)
    assert (r.rows_read, r.rows_accepted, r.rows_refused) == (3, 2, 1)
    q = pd.read_csv(io.BytesIO(Lake.from_settings(s).read_bytes(f"{QUARANTINE}/{r.batch_id}.refused.csv")))
    assert q.line.tolist() == [2] and reason in q.reason[0]


@pytest.mark.parametrize("data,msg", [(b"", "empty"), (b"\n\n", "empty"), (b"junk\n", "no valid line")])
def test_empty_or_all_bad_source_fails(tmp_path, data, msg):
    with pytest.raises(IngestError, match=msg):
        ingest(_settings(tmp_path, data))


def test_missing_file(tmp_path):
    with pytest.raises(IngestError, match="source not found"):
        ingest(get_settings(lake=str(tmp_path), source=str(tmp_path / "nope")))


def test_wrong_checksum(tmp_path):
    with pytest.raises(IngestError, match="checksum mismatch"):
        ingest(_settings(tmp_path, b"ham\thi\n", source_sha256="0" * 64))


def test_corrupt_zip(tmp_path):
    with pytest.raises(IngestError, match="corrupt zip"):
        ingest(_settings(tmp_path, b"PK\x03\x04" + os.urandom(200)))


def test_lake_without_write_permission(tmp_path, corpus):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores mode bits: use a path under a regular file instead
            blocker = tmp_path / "file"
            blocker.write_text("x")
            ro = blocker / "lake"
        with pytest.raises(TableError, match="tables/raw: cannot append"):  # the raw table's first commit
            ingest(get_settings(lake=str(ro), source=str(corpus)))
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_bad_configuration_names_the_variable(monkeypatch):
    monkeypatch.setenv("SPAM_MLOPS_LAKE", "gs://bucket")
    with pytest.raises(ConfigError, match="SPAM_MLOPS_LAKE"):
        get_settings()
    monkeypatch.setenv("SPAM_MLOPS_LAKE", "./lake")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "minio:9000")
    with pytest.raises(ConfigError, match="AWS_ENDPOINT_URL"):
        get_settings()


@pytest.fixture
def http_server(tmp_path):
    "A real HTTP server on localhost serving tmp_path."
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_download_zip_over_http(tmp_path, http_server, corpus):
    "The real download path: fetch the UCI-shaped zip, extract, verify the checksum."
    with zipfile.ZipFile(tmp_path / "sms.zip", "w") as z:
        z.writestr("readme", "SMS Spam Collection")
        z.write(corpus, "SMSSpamCollection")
    sha = hashlib.sha256(corpus.read_bytes()).hexdigest()
    s = get_settings(lake=str(tmp_path / "lake"), source=f"{http_server}/sms.zip", source_sha256=sha)
    r = ingest(s)
    assert r.rows_accepted == 5574 and r.source_sha256 == sha
    with pytest.raises(IngestError, match="404"):
        ingest(get_settings(lake=str(tmp_path / "lake2"), source=f"{http_server}/missing.zip"))


def test_lake_lists_and_refuses_missing(tmp_path):
    lake = Lake.from_settings(get_settings(lake=str(tmp_path)))
    lake.write_bytes("a/b.txt", b"1")
    assert lake.list("a") == ["a/b.txt"] and lake.list("nothing") == []
    with pytest.raises(LakeError, match="not found"):
        lake.read_parquet(CURATED)
    assert not lake.exists(FEATURES)
