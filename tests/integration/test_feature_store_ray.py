"""Feast on Ray (issue 15, item 2): Feast's Ray offline store and Ray compute engine (SPAM_MLOPS_OFFLINE_STORE=ray)
on a real two-node Ray cluster (separate raylets, a 0-CPU head and two 1-CPU workers, as `cluster.LocalCluster`
builds it) give the values of the file store on the same lake: historical retrieval for a set of message_ids and
times, and materialization into a fresh SQLite online store read back online. The work runs as tasks on the
cluster's worker nodes (a Feast that started a Ray of its own here would leave no task there)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from support import feature_repo_copy, worker_nodes

from spam_mlops import cluster
from spam_mlops.config import ConfigError, get_settings
from spam_mlops.feature_store import (
    FeatureStoreError,
    apply,
    feature_store,
    historical_features,
    materialize,
    online_features,
)
from spam_mlops.features import FEATURE_TYPES, FEATURES
from spam_mlops.lake import Lake

pytestmark = pytest.mark.integration



@pytest.fixture(scope="module")
def offline(pipeline_lake) -> pd.DataFrame:
    "The features Parquet of the pipeline lake."
    return Lake.from_settings(pipeline_lake).read_parquet(FEATURES)


@pytest.fixture(scope="module")
def stores(pipeline_lake, two_nodes, tmp_path_factory):
    "(file, ray) settings on the pipeline lake, each with its own repository copy, applied and fully materialized."
    tmp = tmp_path_factory.mktemp("feast")
    file_ = get_settings(lake=pipeline_lake.lake, feature_repo=feature_repo_copy(tmp / "file"), offline_store="file")
    ray_ = get_settings(lake=pipeline_lake.lake, feature_repo=feature_repo_copy(tmp / "ray"), offline_store="ray",
                        ray_address=two_nodes.address)
    reports = {}
    for name, s in (("file", file_), ("ray", ray_)):
        apply(s)
        reports[name] = materialize(s, incremental=False)
    yield file_, ray_, reports
    feature_store.cache_clear()


def _cluster_tasks(c) -> dict:
    "Finished tasks of the cluster: task id -> node id."
    from ray.util.state import list_tasks
    done = list_tasks(address=c.dashboard_url, filters=[("state", "=", "FINISHED")], limit=10_000,
                      raise_on_missing_output=False)
    return {t.task_id: t.node_id for t in done}


def _entity_rows(offline: pd.DataFrame, n: int = 600) -> pd.DataFrame:
    "n messages, each asked at its feature row's time plus 0 s to 300 days (inside the ttl), in a shuffled order."
    rng = np.random.default_rng(7)
    rows = offline.sample(n, random_state=3)[["message_id", "event_timestamp"]].reset_index(drop=True)
    seconds = rng.integers(0, 300 * 86_400, size=n)
    seconds[:20] = 0  # exactly at the feature row's time: the join's boundary
    offset = pd.to_timedelta(seconds, unit="s")
    return rows.assign(event_timestamp=pd.to_datetime(rows.event_timestamp, utc=True) + offset, label="ham")


def test_ray_settings_are_composed_from_the_overlay(stores, two_nodes):
    file_, ray_, _ = stores
    f, r = feature_store(file_).config, feature_store(ray_).config
    assert (f.offline_store.type, r.offline_store.type, r.batch_engine.type) == ("file", "ray", "ray.engine")
    assert r.offline_store.ray_address == r.batch_engine.ray_address == two_nodes.address
    assert r.online_store.type == f.online_store.type == "sqlite"


def test_historical_retrieval_on_ray_equals_the_file_store(stores, offline, two_nodes):
    file_, ray_, _ = stores
    asked = _entity_rows(offline)
    want = historical_features(file_, asked)
    before = _cluster_tasks(two_nodes)
    got = historical_features(ray_, asked)
    pd.testing.assert_frame_equal(got, want)  # same rows, order, values and dtypes
    assert list(got.columns) == [*asked.columns, *FEATURE_TYPES]
    by_id = offline.set_index("message_id").loc[asked.message_id, list(FEATURE_TYPES)].reset_index(drop=True)
    pd.testing.assert_frame_equal(got[list(FEATURE_TYPES)], by_id.astype(FEATURE_TYPES))  # the lake's values
    new = {t: n for t, n in _cluster_tasks(two_nodes).items() if t not in before}
    workers = worker_nodes(two_nodes)
    # ran on the cluster's worker nodes (Ray Data's 0-CPU bookkeeping tasks may stay on the head)
    assert set(new.values()) & workers, (len(new), set(new.values()), workers)


def test_materialization_on_ray_equals_the_file_store(stores, offline, two_nodes):
    file_, ray_, reports = stores
    assert reports["ray"].rows == reports["file"].rows == offline.message_id.nunique() == 5171
    assert Path(feature_store(ray_).config.repo_path) != Path(feature_store(file_).config.repo_path)  # own SQLite
    ids = offline.message_id.tolist() + ["0000000000000000"]
    want, got = online_features(file_, ids), online_features(ray_, ids)
    pd.testing.assert_frame_equal(got, want)
    assert got.iloc[-1, 1:].isna().all() and got.iloc[:-1, 1:].notna().all().all()  # every known message written
    again = materialize(ray_)  # incremental after the full run: an empty window (Feast's Ray engine fails on one)
    assert again.rows == 0 and again.incremental


def test_feast_joins_the_cluster_and_leaves_it(stores, two_nodes):
    import ray
    _, ray_, _ = stores
    historical_features(ray_, pd.DataFrame({"message_id": [], "event_timestamp": []}))  # no call to Feast
    assert not ray.is_initialized()  # each call joins for its block, then disconnects
    other = get_settings(lake=ray_.lake, feature_repo=ray_.feature_repo, offline_store="ray",
                         ray_address=f"127.0.0.1:{cluster.free_port()}")
    ray.init(address=two_nodes.address, log_to_driver=False)
    try:
        with pytest.raises(FeatureStoreError, match=r"connected to [\d.]+:\d+, not to RAY_ADDRESS=127\.0\.0\.1"):
            historical_features(other, _entity_rows(Lake.from_settings(ray_).read_parquet(FEATURES), 5))
    finally: cluster.stop()


def test_a_bad_offline_store_stops_with_one_line_naming_the_variable(monkeypatch):
    monkeypatch.setenv("SPAM_MLOPS_OFFLINE_STORE", "spark")
    with pytest.raises(ConfigError) as e: get_settings()
    assert str(e.value).startswith("invalid configuration: SPAM_MLOPS_OFFLINE_STORE: ") and "\n" not in str(e.value)
    assert "'file' or 'ray'" in str(e.value)
    monkeypatch.setenv("SPAM_MLOPS_OFFLINE_STORE", "ray")
    assert get_settings().offline_store == "ray"
    monkeypatch.delenv("SPAM_MLOPS_OFFLINE_STORE")
    assert get_settings().offline_store == "file"
