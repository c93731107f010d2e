"""The lake's Delta tables (`spam_mlops.tables`) on a folder and on S3 (moto's server): commits and time travel,
history, dedupe by merge, two writers at once, SIGKILL in the middle of a commit, a vacuum that keeps the versions
it is told to keep, and a clear error for a vacuumed version."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
from support import wait_until

from spam_mlops.config import get_settings
from spam_mlops.lake import Lake
from spam_mlops.tables import UPGRADE_MARKER, TableError, table, upgrade

# appends N commits of K rows to table NAME of the lake in SPAM_MLOPS_LAKE; prints each new version
WRITER = """
import sys
import pandas as pd
from spam_mlops.lake import Lake
from spam_mlops.tables import table
name, tag, n, k = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t = table(Lake.from_settings(), name)
for i in range(n):
    rows = pd.DataFrame({"message_id": [f"{tag}-{i}-{j}" for j in range(k)], "writer": tag, "i": i,
                         "text": "x" * 200})
    print(t.append(rows, meta={"writer": tag, "i": i}), flush=True)
"""

# merges the same N batches of K keys into table NAME (as two ingests of one batch at once would)
MERGER = """
import sys
import pandas as pd
from spam_mlops.lake import Lake
from spam_mlops.tables import table
name, tag, n, k = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t = table(Lake.from_settings(), name)
for i in range(n):
    t.merge(pd.DataFrame({"message_id": [f"k{i}-{j}" for j in range(k)], "writer": tag}), meta={"writer": tag})
"""


@pytest.fixture(params=["local", "s3"])
def settings(request, tmp_path, monkeypatch):
    "Settings of an empty lake: a folder, or a new bucket on the moto server (plain HTTP allowed)."
    if request.param == "local": s = get_settings(lake=str(tmp_path / "lake"))
    else:
        request.getfixturevalue("s3_env")
        s = get_settings(lake=f"s3://tables-{uuid.uuid4().hex[:8]}/lake", s3_allow_http=True)
        monkeypatch.setenv("SPAM_MLOPS_S3_ALLOW_HTTP", "true")
    monkeypatch.setenv("SPAM_MLOPS_LAKE", s.lake)  # for the writer processes
    return s


def _rows(ids, label="ham", at="2026-12-01 10:00"):
    return pd.DataFrame({"message_id": list(ids), "label": label, "ingested_at": pd.Timestamp(at, tz="UTC")})


def _writer(name, tag, n, k, script=WRITER):
    return subprocess.Popen([sys.executable, "-c", script, name, tag, str(n), str(k)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())


def test_versions_history_and_time_travel(settings):
    t = table(Lake.from_settings(settings), "raw", settings)
    assert not t.exists() and t.version() is None and t.read().empty and t.history().empty
    assert t.append(_rows("ab"), meta={"batch_id": "b1", "source": "uci"}) == 0
    assert t.append(_rows("cd"), meta={"batch_id": "b2"}) == 1
    assert t.merge(_rows("cde"), meta={"batch_id": "b3"}) == {"version": 2, "inserted": 1, "updated": 0}
    assert t.merge(_rows("cde")) == {"version": 2, "inserted": 0, "updated": 0}  # nothing new: no commit
    assert t.merge(_rows("a", label="spam"), update=True) == {"version": 3, "inserted": 0, "updated": 1}
    assert sorted(t.read().message_id) == list("abcde") and t.read(version=1).label.tolist() == ["ham"] * 4
    assert t.read(filters=[("label", "=", "spam")]).message_id.tolist() == ["a"]
    h = t.history()
    assert h.version.tolist() == [0, 1, 2, 3] and h.operation.tolist() == ["WRITE", "WRITE", "MERGE", "MERGE"]
    assert h.rows_added.tolist() == [2, 2, 1, 0] and h.rows_total.tolist() == [2, 4, 5, 5]
    assert h.meta.tolist() == [{"batch_id": "b1", "source": "uci"}, {"batch_id": "b2"}, {"batch_id": "b3"}, {}]
    assert (h.timestamp.diff().dropna() >= pd.Timedelta(0)).all() and str(h.timestamp.dt.tz) == "UTC"
    with pytest.raises(TableError, match=r"version 7 does not exist \(the latest is 3\); the oldest readable is 0"):
        t.read(version=7)


def test_types_round_trip_and_new_columns(settings):
    t = table(Lake.from_settings(settings), "feedback", settings)
    at = pd.to_datetime(["2026-12-01 10:00:00.123456", "2026-12-01 11:00:00.000001"], utc=True)
    ns = pd.DataFrame({"prediction_id": [None, None], "label": ["ham", "spam"], "received_at": at})
    t.append(ns)  # nanoseconds become microseconds; an all-null column becomes a string column
    t.append(ns.assign(prediction_id=["p1", "p2"], api_key_id="k1"))  # a new column joins the schema
    df = t.read().sort_values(["api_key_id", "received_at"], na_position="first", ignore_index=True)
    assert str(df.received_at.dtype) == "datetime64[us, UTC]" and df.received_at.tolist() == [*at, *at]
    assert df.prediction_id.tolist() == [None, None, "p1", "p2"] and df.api_key_id.tolist() == [None, None, "k1", "k1"]


def test_two_writers_at_once_lose_no_commit(settings):
    "Two processes append to one (not yet created) table at the same time: every commit of both is there."
    n, k = 12, 50
    procs = [_writer("predictions", tag, n, k) for tag in ("w1", "w2")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    t = table(Lake.from_settings(settings), "predictions", settings)
    df, h = t.read(), t.history()
    assert len(df) == 2 * n * k and df.message_id.is_unique
    assert t.version() == 2 * n - 1 and len(h) == 2 * n
    assert sorted((m["writer"], m["i"]) for m in h.meta) == sorted((w, i) for w in ("w1", "w2") for i in range(n))
    assert h.rows_total.tolist() == [k * (v + 1) for v in h.version]


def test_two_merges_of_the_same_keys_insert_each_once(settings):
    "Two processes merge the same new keys at once: a conflicting merge is retried, so no key is inserted twice."
    table(Lake.from_settings(settings), "raw", settings).append(pd.DataFrame({"message_id": ["seed"], "writer": "-"}))
    n, k = 10, 50
    procs = [_writer("raw", tag, n, k, MERGER) for tag in ("m1", "m2")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    df = table(Lake.from_settings(settings), "raw", settings).read()
    assert len(df) == 1 + n * k and df.message_id.is_unique


def test_sigkill_mid_commit_keeps_a_consistent_version(settings):
    "A writer killed with SIGKILL while it appends leaves the table readable at a whole version, and writable."
    t = table(Lake.from_settings(settings), "curated", settings)
    k = 2000
    for attempt in range(3):
        proc = _writer("curated", f"a{attempt}", 10_000, k)
        target = (t.version() or 0) + 2
        wait_until(lambda target=target: (t.version() or -1) >= target, timeout=120, what="commits of the writer")
        time.sleep(0.05 * attempt)  # a different moment of the commit cycle each time
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        v = t.version()
        df = t.read()
        assert len(df) == k * (v + 1) and df.groupby(["writer", "i"]).size().eq(k).all()
        assert t.history().rows_total.iloc[-1] == len(df)
    assert t.append(_rows(["after"]).assign(writer="z", i=0, text="y")) == v + 1


def test_vacuum_keeps_what_kept_versions_need(settings):
    t = table(Lake.from_settings(settings), "curated", settings)
    for i in range(4): t.append(_rows([f"m{i}", f"n{i}"]))
    t.merge(_rows(["m0"], label="spam"), update=True)  # version 4 rewrites the file that holds m0
    c = t.compact(min_files=2)
    assert c["compacted"] and c["version"] == 5 and c["files_added"] == 1
    assert t.compact(min_files=2)["compacted"] is False  # one file left
    v = t.vacuum(retention_hours=0, keep_versions=[1])
    assert v["deleted"] == [] and 0 < v["retention_hours"] < 1  # version 1 is seconds old: its files stay
    assert len(t.read(version=1)) == 4 and t.oldest_readable_version() == 0
    dry = t.vacuum(retention_hours=0, dry_run=True)
    assert dry["deleted"] and len(t.read(version=1)) == 4  # a dry run deletes nothing
    assert sorted(t.vacuum(retention_hours=0)["deleted"]) == sorted(dry["deleted"])
    oldest = t.oldest_readable_version()
    assert oldest == 5 and len(t.read(version=oldest)) == 8
    with pytest.raises(TableError, match=r"version 1 is no longer readable \(vacuumed\); the oldest readable is 5"):
        t.read(version=1)
    with pytest.raises(TableError, match=r"cannot keep versions \[99\]"): t.vacuum(keep_versions=[99])


def test_upgrade_copies_the_old_layout_once(settings):
    "A lake of the old layout (raw CSV + manifest, curated Parquet, predictions/ and feedback/ files) becomes tables."
    lake = Lake.from_settings(settings)
    lake.write_bytes("raw/sms_spam.csv", b"message_id,label,text\nm1,ham,hi there\nm2,spam,WIN cash\nm3,ham,ok\n")
    lake.write_json("raw/manifest.json", {"source": "uci", "source_sha256": "cd" * 32, "rows_read": 4,
                                          "rows_accepted": 3, "rows_refused": 1, "ingested_at": "2026-11-30T10:00:00"})
    lake.write_parquet("curated/sms_clean.parquet", pd.DataFrame(
        {"message_id": ["m1", "m2"], "label": ["ham", "spam"], "text": ["hi there", "WIN cash"],
         "clean_text": ["hi there", "win cash"]}))
    for day, req in (("2026-11-29", "r1"), ("2026-11-30", "r2")):
        lake.write_parquet(f"predictions/dt={day}/120000-{req}.parquet", pd.DataFrame(
            {"timestamp": pd.Timestamp(f"{day} 12:00", tz="UTC"), "request_id": req, "message_id": ["m1", "m9"],
             "spam_probability": [0.2, 0.8], "prediction": ["ham", "spam"], "model_version": "3"}))
    lake.write_bytes("predictions/dt=2026-11-30/130000-bad.parquet", b"not parquet")
    lake.write_bytes("feedback/dt=2026-11-30/140000-a.csv",
                     b"message_id,label,timestamp\nm9,spam,2026-11-30T14:00:00\n")
    r = upgrade(lake, settings)
    assert {n: t["rows"] for n, t in r["tables"].items()} == {"raw": 3, "batches": 1, "curated": 2, "predictions": 4,
                                                              "feedback": 1}
    assert [u["file"] for u in r["unreadable"]] == ["predictions/dt=2026-11-30/130000-bad.parquet"]
    raw = table(lake, "raw", settings).read().sort_values("line")
    assert raw.line.tolist() == [1, 2, 3] and set(raw.batch_id) == {"b-" + "cd" * 6} and set(raw.source) == {"uci"}
    assert str(raw.ingested_at.dtype) == "datetime64[us, UTC]"
    preds = table(lake, "predictions", settings)
    assert sorted(preds.read().prediction_id) == ["r1:0", "r1:1", "r2:0", "r2:1"]
    assert preds.read(filters=[("dt", "=", "2026-11-29")]).request_id.tolist() == ["r1", "r1"]
    fb = table(lake, "feedback", settings).read()
    assert fb.iloc[0].to_dict() | {"received_at": None} == {
        "prediction_id": None, "message_id": "m9", "text": None, "label": "spam", "api_key_id": None,
        "received_at": None, "source": "upgrade"}
    b = table(lake, "batches", settings).read().iloc[0]
    assert (b.rows_read, b.rows_new, b.raw_version) == (4, 3, 0)
    versions = {n: table(lake, n, settings).version() for n in r["tables"]}
    assert upgrade(lake, settings)["unchanged"]  # a second run changes nothing
    assert {n: table(lake, n, settings).version() for n in r["tables"]} == versions
    assert lake.exists("raw/sms_spam.csv") and lake.exists("feedback/dt=2026-11-30/140000-a.csv")  # old files stay


def test_an_interrupted_upgrade_redoes_only_what_is_missing(tmp_path):
    "Steps committed before a crash are not repeated (each step's commit names itself)."
    s = get_settings(lake=str(tmp_path))
    lake = Lake.from_settings(s)
    lake.write_bytes("raw/sms_spam.csv", b"message_id,label,text\nm1,ham,hi\n")
    lake.write_bytes("feedback/dt=2026-11-30/a.csv", b"message_id,label\nm1,spam\n")
    upgrade(lake, s)
    lake.fs.delete_file(lake.path(UPGRADE_MARKER))  # as if killed before the marker was written
    r = upgrade(lake, s)
    assert all(t.get("done") for t in r["tables"].values()) and len(table(lake, "feedback", s).read()) == 1


def test_cli_vacuum_keeps_the_versions_registered_models_name(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from spam_mlops.cli import app
    from spam_mlops.registry import client
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    s = get_settings(lake=str(tmp_path / "lake"))
    t = table(Lake.from_settings(s), "curated", s)
    for i in range(3): t.append(_rows([f"m{i}"]))
    t.merge(_rows(["m0"], label="spam"), update=True)
    t.compact(min_files=2)
    c = client(uri)
    c.create_registered_model("spam_detection")
    c.create_model_version("spam_detection", source=str(tmp_path), tags={"data.curated_version": "1"})
    env = {"SPAM_MLOPS_LAKE": s.lake, "MLFLOW_TRACKING_URI": uri, "SPAM_MLOPS_TABLES_RETENTION_HOURS": "0"}
    def lake_cli(*args):
        r = CliRunner().invoke(app, ["-v", "lake", *args], env=env)
        assert r.exit_code == 0, r.output
        return r.stdout
    out = lake_cli("vacuum", "curated")
    assert out.startswith("lake vacuum: curated: 0 files deleted (retention 0.0 h; keeping versions [1])"), out
    assert len(t.read(version=1)) == 2
    c.delete_registered_model("spam_detection")
    assert "to delete" in lake_cli("vacuum", "curated", "--dry-run") and len(t.read(version=1)) == 2
    assert lake_cli("vacuum", "curated").startswith("lake vacuum: curated: 4 files deleted (retention 0.0 h)")
    with pytest.raises(TableError, match="the oldest readable is 4"): t.read(version=1)  # 4: the compaction
    assert [line.split()[3] for line in lake_cli("history", "curated").splitlines()[1:6]] == [
        "WRITE", "WRITE", "WRITE", "MERGE", "OPTIMIZE"]


def test_lake_upgrade_of_the_corpus_from_the_command_line(tmp_path, corpus):
    "`spam-mlops lake upgrade` on a lake holding the whole corpus in the old layout, then `lake history raw`."
    from spam_mlops.ingest import message_id
    lines = [line.split("\t", 1) for line in corpus.read_text(encoding="utf-8").splitlines() if "\t" in line]
    old = pd.DataFrame(lines, columns=["label", "text"])
    old.insert(0, "message_id", old.text.map(message_id))
    lake = Lake.from_settings(get_settings(lake=str(tmp_path)))
    lake.write_bytes("raw/sms_spam.csv", old.to_csv(index=False).encode())
    env = {**os.environ, "SPAM_MLOPS_LAKE": str(tmp_path)}
    cli = [str(Path(sys.executable).parent / "spam-mlops"), "lake"]
    r = subprocess.run([*cli, "upgrade"], env=env, capture_output=True, text=True, timeout=300)
    unique = old.message_id.nunique()
    assert r.returncode == 0 and r.stdout.strip() == f"lake upgrade: raw {unique} rows (v0), batches 1 rows (v0)", r
    raw = table(lake, "raw").read()
    assert len(raw) == unique and raw.message_id.is_unique and raw.line.min() == 1 and len(old) > unique
    first = old.drop_duplicates("message_id").set_index("message_id").text
    assert (raw.set_index("message_id").text.sort_index() == first.sort_index()).all()  # a text's first line kept
    r = subprocess.run([*cli, "history", "raw"], env=env, capture_output=True, text=True, timeout=300)
    row = r.stdout.splitlines()[1].split()
    assert r.returncode == 0 and row[0] == "0" and row[3:6] == ["WRITE", str(unique), str(unique)], r.stdout
    assert '{"upgrade": "raw"}' in r.stdout
