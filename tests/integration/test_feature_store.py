"""Feast feature store against the real Redis (127.0.0.1:6379, database 11) and SQLite, on a lake made by the
pipeline."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
import redis
from support import free_port

from spam_mlops.config import get_settings
from spam_mlops.feature_store import (
    _REDIS,
    FEATURE_VIEW,
    REDIS_FAIL_MAX,
    FeatureSchemaError,
    FeatureStoreError,
    MissingFeaturesError,
    OnlineStoreUnreachable,
    apply,
    feature_store,
    historical_features,
    materialize,
    online_features,
)
from spam_mlops.features import FEATURE_TYPES, FEATURES
from spam_mlops.lake import Lake

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
REDIS_DB = 11  # this suite's own database; every test leaves it as it found it
REDIS_URL = os.environ.get("SPAM_MLOPS_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{REDIS_DB}")
FEAST = str(Path(sys.executable).with_name("feast"))


def _repo(tmp: Path) -> str:
    "A private copy of feature_repo/ (same YAML and definitions; its own registry and SQLite files)."
    shutil.copytree(ROOT / "feature_repo", tmp, ignore=shutil.ignore_patterns("data", "__pycache__"))
    return str(tmp)


def _on_redis(pipeline_lake, tmp_path: Path, url: str):
    "Settings of the pipeline lake with a private repository copy and the Redis at `url`."
    return get_settings(lake=pipeline_lake.lake, feature_repo=_repo(tmp_path / "repo"), online_store="redis",
                        redis_url=url)


@pytest.fixture(scope="module")
def offline(pipeline_lake) -> pd.DataFrame:
    "The features Parquet of the pipeline lake, indexed by message_id."
    return Lake.from_settings(pipeline_lake).read_parquet(FEATURES).set_index("message_id")


@pytest.fixture
def redis_db():
    "A client on the suite's Redis database; the test must leave no key behind."
    r = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    before = r.dbsize()
    yield r
    assert r.dbsize() == before, "keys left behind in Redis"
    r.close()


@pytest.fixture(params=["sqlite", "redis"])
def store_settings(request, pipeline_lake, tmp_path):
    "Settings for the pipeline lake with each online store; the Redis store is torn down afterwards."
    s = get_settings(lake=pipeline_lake.lake, feature_repo=_repo(tmp_path / "repo"), online_store=request.param,
                     redis_url=REDIS_URL)
    r = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    before = r.dbsize()
    yield s
    feature_store(s).teardown()  # drops the SQLite tables / the project's Redis keys
    feature_store.cache_clear()
    assert r.dbsize() == before, "keys left behind in Redis"


def test_materialize_every_row_and_read_back(store_settings, offline):
    print(apply(store_settings))
    report = materialize(store_settings, incremental=False)
    assert report.rows == len(offline) == 5171
    if store_settings.online_store == "redis":
        assert redis.Redis.from_url(REDIS_URL).dbsize() >= len(offline)  # the rows really are in Redis
    ids = offline.sample(300, random_state=0).index.tolist()
    got = online_features(store_settings, ids + ["0000000000000000"])
    assert got.message_id.tolist() == ids + ["0000000000000000"]
    assert got.iloc[-1, 1:].isna().all()  # unknown message: nulls, not an exception
    pd.testing.assert_frame_equal(got.iloc[:-1].set_index("message_id").astype(FEATURE_TYPES),
                                  offline.loc[ids, list(FEATURE_TYPES)], check_names=False)
    assert materialize(store_settings).rows == 0  # incremental after a full run: nothing new


def test_first_incremental_run_materializes_everything(store_settings, offline):
    apply(store_settings)
    assert materialize(store_settings).rows == len(offline)  # the lake was ingested now: inside now − ttl
    one = offline.index[42]
    got = online_features(store_settings, [one])
    assert got.text_length.tolist() == [offline.loc[one, "text_length"]]


def test_sqlite_and_redis_have_separate_registries(pipeline_lake, tmp_path, redis_db):
    repo = _repo(tmp_path / "repo")
    sq = get_settings(lake=pipeline_lake.lake, feature_repo=repo, online_store="sqlite")
    rd = get_settings(lake=pipeline_lake.lake, feature_repo=repo, online_store="redis", redis_url=REDIS_URL)
    try:
        apply(sq), apply(rd)
        assert materialize(sq).rows == 5171
        assert materialize(rd).rows == 5171  # not skipped because SQLite's window was done
        assert next(redis_db.scan_iter(count=1000), None) is not None, "nothing written to Redis"
        closed = f"redis://127.0.0.1:{free_port()}/0"  # same registry, nothing left to materialize, dead server
        with pytest.raises(OnlineStoreUnreachable, match=f"unreachable at {closed}"):
            materialize(get_settings(lake=pipeline_lake.lake, feature_repo=repo, online_store="redis",
                                     redis_url=closed))
    finally:
        feature_store(sq).teardown(), feature_store(rd).teardown()
        feature_store.cache_clear()


def test_historical_features_return_exactly_the_rows_asked(pipeline_lake, tmp_path, offline):
    s = get_settings(lake=pipeline_lake.lake, feature_repo=_repo(tmp_path / "repo"))
    apply(s)
    ids = offline.sample(500, random_state=1).index.tolist()
    ids = ids + ids[:5]  # duplicates are kept too
    t = offline.event_timestamp.iloc[0] + pd.Timedelta(days=1)
    asked = pd.DataFrame({"message_id": ids, "event_timestamp": t, "split": "train"}, index=range(1000, 1505))
    frame = historical_features(s, asked)
    assert frame.index.tolist() == asked.index.tolist() and frame.message_id.tolist() == ids
    assert frame.split.eq("train").all()
    pd.testing.assert_frame_equal(frame.set_index("message_id")[list(FEATURE_TYPES)],
                                  offline.loc[ids, list(FEATURE_TYPES)], check_names=False)
    early = asked.head(3).assign(event_timestamp=offline.event_timestamp.iloc[0] - pd.Timedelta(days=1))
    with pytest.raises(MissingFeaturesError, match="3 of 3 .*before their feature row"):
        historical_features(s, early)
    unknown = asked.head(4).assign(message_id=ids[:3] + ["ffffffffffffffff"])
    with pytest.raises(MissingFeaturesError, match=r"1 of 4 .*unknown.*ffffffffffffffff"):
        historical_features(s, unknown)
    with pytest.raises(FeatureStoreError, match="event_timestamp"):
        historical_features(s, asked[["message_id"]])
    feature_store.cache_clear()


@pytest.mark.timeout(60)
def test_unreachable_redis_fails_fast_naming_the_url(pipeline_lake, tmp_path):
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nobody listens there
    s = _on_redis(pipeline_lake, tmp_path, closed)
    apply(s)  # registering definitions needs no Redis
    t = time.perf_counter()
    with pytest.raises(OnlineStoreUnreachable, match=f"unreachable at {closed}"):
        materialize(s)
    t_mat, t = time.perf_counter() - t, time.perf_counter()
    with pytest.raises(OnlineStoreUnreachable, match=f"unreachable at {closed}"):
        online_features(s, ["abc"])
    print(f"\ndead Redis port: materialize failed in {t_mat:.2f} s, online read in {time.perf_counter() - t:.2f} s")
    feature_store.cache_clear()
    _REDIS.clear()


@pytest.mark.timeout(60)
def test_silent_redis_times_out_naming_the_url(pipeline_lake, tmp_path):
    server = socket.socket()  # accepts connections, never answers
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    url = f"redis://:secret@127.0.0.1:{server.getsockname()[1]}/0"
    s = _on_redis(pipeline_lake, tmp_path, url)
    try:
        apply(s)
        t = time.perf_counter()
        with pytest.raises(OnlineStoreUnreachable, match=r"unreachable at redis://:\*\*\*@127.0.0.1") as e:
            online_features(s, ["abc"])
        t_read, t = time.perf_counter() - t, time.perf_counter()
        assert "secret" not in str(e.value)
        timed_out = r"unreachable at redis://:\*\*\*@127.0.0.1.*(?i:timeout|timed out)"
        with pytest.raises(OnlineStoreUnreachable, match=timed_out):
            materialize(s)
        print(f"\nsilent Redis: online read failed in {t_read:.2f} s, materialize in {time.perf_counter() - t:.2f} s "
              "(socket_timeout 3 s, no retry on a timeout)")
    finally:
        server.close()
        feature_store.cache_clear()
        _REDIS.clear()


@pytest.mark.timeout(60)
def test_circuit_opens_on_unreachable_redis_and_tries_again_later(pipeline_lake, tmp_path):
    """A server that accepts and at once closes every connection: each call is retried once, then fails naming
    the URL; after REDIS_FAIL_MAX failed calls the circuit is open and a call fails without connecting; after
    the reset time one call tries again."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []

    def slam():
        while True:
            try: conn, _ = server.accept()
            except OSError: return  # closed by the test
            accepted.append(1)
            conn.close()
    threading.Thread(target=slam, daemon=True).start()
    url = f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    s = _on_redis(pipeline_lake, tmp_path, url)
    try:
        apply(s)
        for i in range(REDIS_FAIL_MAX):
            with pytest.raises(OnlineStoreUnreachable, match=f"unreachable at {url}: (?!circuit)"):
                online_features(s, ["abc"])
            assert len(accepted) == 2 * (i + 1)  # one retry after a refused/reset connection
        t = time.perf_counter()
        with pytest.raises(OnlineStoreUnreachable, match=f"unreachable at {url}: circuit open after {REDIS_FAIL_MAX}"):
            online_features(s, ["abc"])
        with pytest.raises(OnlineStoreUnreachable, match="circuit open"):
            materialize(s)
        print(f"\ncircuit open: online read and materialize refused in {time.perf_counter() - t:.3f} s "
              "without connecting")
        assert len(accepted) == 2 * REDIS_FAIL_MAX  # no connection while open
        _REDIS[url].breaker.reset_timeout = 0.5
        time.sleep(0.6)
        with pytest.raises(OnlineStoreUnreachable, match=f"unreachable at {url}: (?!circuit)"):
            online_features(s, ["abc"])  # half-open: one call tries, fails, the circuit opens again
        assert len(accepted) > 2 * REDIS_FAIL_MAX and _REDIS[url].state == "open"
    finally:
        server.close()
        feature_store.cache_clear()
        _REDIS.clear()


def test_missing_or_mistyped_column_is_named(pipeline_lake, tmp_path, offline):
    lake = Lake.from_settings(get_settings(lake=str(tmp_path / "lake")))
    good = offline.reset_index()
    lake.write_parquet(FEATURES, good.drop(columns=["has_url"]))
    s = get_settings(lake=str(tmp_path / "lake"), feature_repo=_repo(tmp_path / "repo"))
    with pytest.raises(FeatureSchemaError, match="'has_url' is missing"):
        apply(s)
    lake.write_parquet(FEATURES, good)
    apply(s)
    lake.write_parquet(FEATURES, good.astype({"digit_ratio": "float32"}))  # broken after apply
    with pytest.raises(FeatureSchemaError, match="'digit_ratio' has type float, expected float64"):
        materialize(s)
    lake.fs.delete_file(lake.path(FEATURES))
    with pytest.raises(FeatureSchemaError, match="not found: run `spam-mlops features`"):
        materialize(s)
    feature_store.cache_clear()


def test_materialize_needs_apply_on_the_same_lake(pipeline_lake, tmp_path, offline):
    repo = _repo(tmp_path / "repo")
    s = get_settings(lake=pipeline_lake.lake, feature_repo=repo)
    with pytest.raises(FeatureStoreError, match="not in the registry.*feast-apply"):
        materialize(s)
    apply(s)
    other = tmp_path / "other-lake"
    Lake.from_settings(get_settings(lake=str(other))).write_parquet(FEATURES, offline.reset_index())
    with pytest.raises(FeatureStoreError, match=f"registered over .* not {other}.*feast-apply"):
        materialize(get_settings(lake=str(other), feature_repo=repo))
    feature_store.cache_clear()


@pytest.mark.timeout(300)
def test_feast_cli_in_the_feature_repo(pipeline_lake, tmp_path, offline):
    repo = _repo(tmp_path / "repo")
    env = {**os.environ, "SPAM_MLOPS_LAKE": pipeline_lake.lake}

    def feast(*args):
        r = subprocess.run([FEAST, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    assert "Created feature view message_features" in feast("apply")
    assert FEATURE_VIEW in feast("feature-views", "list")
    feast("materialize-incremental", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    s = get_settings(lake=pipeline_lake.lake, feature_repo=repo)  # the same registry, read by spam_mlops
    ids = offline.index[:20].tolist()
    got = online_features(s, ids).set_index("message_id").astype(FEATURE_TYPES)
    pd.testing.assert_frame_equal(got, offline.loc[ids, list(FEATURE_TYPES)], check_names=False)
    feature_store.cache_clear()


def test_s3_lake(s3_env, pipeline_lake, tmp_path, offline):
    s3 = get_settings(lake="s3://spam-feast-test/prod", feature_repo=_repo(tmp_path / "repo"))
    Lake.from_settings(s3).write_parquet(FEATURES, offline.reset_index())
    print(apply(s3))
    assert materialize(s3, incremental=False).rows == len(offline)
    ids = offline.index[-10:].tolist()
    got = online_features(s3, ids).set_index("message_id").astype(FEATURE_TYPES)
    pd.testing.assert_frame_equal(got, offline.loc[ids, list(FEATURE_TYPES)], check_names=False)
    t = offline.event_timestamp.iloc[0] + pd.Timedelta(hours=1)
    frame = historical_features(s3, pd.DataFrame({"message_id": ids, "event_timestamp": t}))
    assert frame.message_id.tolist() == ids
    feature_store.cache_clear()
