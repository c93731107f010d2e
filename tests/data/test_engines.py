"""The two engines of ingest, curate and features (issue 15, item 1): Ray Data on a real two-node Ray cluster (separate
raylets, a 0-CPU head and two 1-CPU workers, as `cluster.LocalCluster` builds it) produces exactly what the local
engine produces, ingest included: the same raw rows, batches and ingest quarantine (bad lines refused with the same
reasons), the same message_ids, rows, values and dtypes, the same (empty) conflict quarantine, batch after batch;
and its tasks ran on both worker nodes."""
from __future__ import annotations

import pandas as pd
import pytest
from support import corpus_path, worker_nodes

from spam_mlops.config import get_settings
from spam_mlops.curate import CONFLICTS, read_curated
from spam_mlops.engine import run, table_rows
from spam_mlops.features import read_features
from spam_mlops.ingest import BATCHES_TABLE, QUARANTINE, RAW_TABLE
from spam_mlops.lake import Lake
from spam_mlops.tables import Table

pytestmark = pytest.mark.integration


def _batches(tmp_path) -> list:
    "The corpus as two batches (files): the first 3,000 lines, then the rest."
    lines = corpus_path().read_bytes().splitlines(keepends=True)
    out = []
    for i, part in enumerate((lines[:3000], lines[3000:])):
        bad = [b"spam\n", b"maybe\tunknown label\n", b"ham\t\xff\xfe\n", b"ham\t  \n"] if i else []
        (p := tmp_path / f"batch{i}.txt").write_bytes(b"".join(part + bad))  # bad lines: quarantined
        out.append(p)
    return out


def _same_raw(a: Lake, b: Lake, settings) -> int:
    "Raw rows, batches and ingest quarantine files of two lakes are equal (ingest times aside)."
    raw = [Table(x, RAW_TABLE, settings).read().drop(columns="ingested_at").sort_values("message_id", ignore_index=True)
           for x in (a, b)]
    pd.testing.assert_frame_equal(*raw)
    cols = ["batch_id", "rows_read", "rows_accepted", "rows_refused", "rows_new", "raw_version"]
    pd.testing.assert_frame_equal(*[Table(x, BATCHES_TABLE, settings).read()[cols] for x in (a, b)])
    files = [x.list(QUARANTINE) for x in (a, b)]
    assert files[0] == files[1], files
    assert [a.read_bytes(f) for f in files[0]] == [b.read_bytes(f) for f in files[1]]  # the same refused lines
    return len(raw[0])


def _same(a: Lake, b: Lake):
    "Curated rows, features and conflict files of two lakes are equal (run times aside), with the same dtypes."
    cur = [read_curated(x).drop(columns="curated_at").sort_values("message_id", ignore_index=True) for x in (a, b)]
    pd.testing.assert_frame_equal(*cur)
    feats = [read_features(x).drop(columns="event_timestamp").sort_values("message_id", ignore_index=True)
             for x in (a, b)]
    pd.testing.assert_frame_equal(*feats)
    assert feats[0].message_id.tolist() == cur[0].message_id.tolist()
    assert [sorted(x.list(CONFLICTS)) if x.exists(CONFLICTS) else [] for x in (a, b)] == [[], []]
    return len(cur[0])


def test_ray_engine_equals_the_local_engine_on_two_nodes(two_nodes, tmp_path, monkeypatch):
    from ray.util.state import list_tasks
    monkeypatch.setenv("SPAM_MLOPS_DATA_BLOCK_ROWS", "1000")  # several blocks per run, so both nodes get some
    local = get_settings(lake=str(tmp_path / "local"))
    ray_ = get_settings(lake=str(tmp_path / "ray"), ray_address=two_nodes.address)
    rows = []
    for batch in _batches(tmp_path):
        got = {e: run("ingest", s, e, source=str(batch)) for e, s in (("local", local), ("ray", ray_))}
        same = [r.__dict__ | {"ingested_at": None, "quarantine": r.quarantine and r.quarantine.rsplit("/", 1)[-1]}
                for r in got.values()]
        assert same[0] == same[1], got  # the same report, but for the time and the lake's root
        raw_rows = _same_raw(Lake.from_settings(local), Lake.from_settings(ray_), local)
        reports = {e: (run("curate", s, e), run("features", s, e)) for e, s in (("local", local), ("ray", ray_))}
        for stage in (0, 1):  # each engine reports the same new rows, and only the new ones
            assert reports["local"][stage].__dict__ | {"curated": None, "features": None} == \
                   reports["ray"][stage].__dict__ | {"curated": None, "features": None}, reports
        rows.append(_same(Lake.from_settings(local), Lake.from_settings(ray_)))
    assert 2_000 < rows[0] < rows[1] == raw_rows, rows  # the second batch added rows, and the runs added only those
    assert len(Lake.from_settings(ray_).list(QUARANTINE)) == 1  # the second batch's four bad lines
    assert table_rows(Table(Lake.from_settings(ray_), RAW_TABLE, ray_)) == rows[1]  # raw holds one row per message
    assert "0 new rows" in str(run("curate", ray_, "ray"))  # nothing new: no commit, nothing computed

    done = list_tasks(address=two_nodes.dashboard_url, filters=[("state", "=", "FINISHED")], limit=10_000,
                      raise_on_missing_output=False)
    nodes = {t.node_id for t in done if "MapBatches" in t.name}
    workers = worker_nodes(two_nodes)
    assert len(workers) == 2 and nodes == workers, (nodes, workers)  # the work ran on both worker nodes
