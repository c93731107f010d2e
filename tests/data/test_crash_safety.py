"""Crash safety of the lake: a stage killed with SIGKILL in the middle of writing leaves the previous version
readable and intact, and rerunning completes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from spam_mlops.config import get_settings
from spam_mlops.curate import CURATED_TABLE, read_curated
from spam_mlops.features import FEATURES, FEATURES_MANIFEST, features, read_features
from spam_mlops.ingest import message_id
from spam_mlops.lake import Lake
from spam_mlops.tables import Table

CLI = str(Path(sys.executable).parent / "spam-mlops")


@pytest.fixture
def big_lake(tmp_path, pipeline_lake):
    "A lake whose curated table is large enough (400k rows) that writing its features takes a while."
    src = Lake.from_settings(pipeline_lake)
    s = get_settings(lake=str(tmp_path / "lake"))
    lake = Lake.from_settings(s)
    cur = read_curated(src).sample(400_000, replace=True, random_state=1).reset_index(drop=True)
    cur["text"] = cur.text + " #" + cur.index.astype(str)
    cur["message_id"] = [message_id(t) for t in cur.text]
    Table(lake, CURATED_TABLE, s).append(cur)
    features(s)
    return s


def test_sigkill_mid_write_keeps_previous_version(big_lake):
    lake = Lake.from_settings(big_lake)
    before = lake.read_bytes(FEATURES)
    folder = Path(lake.path("features"))
    killed_mid_write = 0
    for _attempt in range(5):
        # --full: every row again (a rerun alone has nothing new to write)
        proc = subprocess.Popen([CLI, "features", "--full"], env={**os.environ, "SPAM_MLOPS_LAKE": big_lake.lake},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if any(p.name.startswith(".tmp-") for p in folder.iterdir()):
                proc.send_signal(signal.SIGKILL)  # the temporary file exists: the write is in progress
                killed_mid_write += 1
                break
            time.sleep(0.0005)
        proc.wait(30)
        # whatever the moment of death, readers see the previous version, whole
        assert lake.read_bytes(FEATURES) == before
        assert lake.list("features") == [FEATURES_MANIFEST, FEATURES]
        if killed_mid_write: break
    assert killed_mid_write, "never caught the stage mid-write"
    r = subprocess.run([CLI, "features", "--full"], env={**os.environ, "SPAM_MLOPS_LAKE": big_lake.lake},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert read_features(lake).equals(pd.read_parquet(folder / "nlp_features.parquet"))
    assert len(read_features(lake)) == 400_000
