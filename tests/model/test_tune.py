"""Tuning: input checks before any trial, a real ASHA search on Ray (a crashing trial, early stops, nested MLflow runs,
charts, the winner through train's gate), and a search interrupted in another process then resumed from the lake."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import mlflow
import numpy as np
import pandas as pd
import pytest

from spam_mlops import cluster
from spam_mlops.config import get_settings
from spam_mlops.lake import Lake
from spam_mlops.train import DEFAULT_CONFIG, fit_model, prepare_data, split_frame
from spam_mlops.tune import (
    METRICS,
    SEARCH_SPACE,
    TUNE_DIR,
    TuneError,
    _prepare,
    metric_mode,
    param_space,
    search,
)

TINY = {"max_len": 24, "patience": 10}  # short sequences; no early stopping by the loop itself, so ASHA's stops show


@pytest.fixture
def tracked(pipeline_lake, tmp_path, monkeypatch):
    "Settings on the session lake with a fresh SQLite tracking store."
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield get_settings(lake=pipeline_lake.lake, mlflow_tracking_uri=uri)
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def ray_cluster():
    "One local Ray (2 CPUs, random ports) for the module's searches, through spam_mlops.cluster; stopped at the end."
    cluster.start(2, settings=get_settings(ray_address=""), purpose="test")
    yield
    cluster.stop()


def _children(client, parent_id: str, role: str = "trial"):
    exp = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'")
    return [r for r in runs if r.data.tags.get("tune.role") == role]


# --- bad input: a clear error before Ray, MLflow or the lake are touched ----------------------------------------------

@pytest.mark.parametrize("kw, msg", [
    ({"space": {}}, "search space is empty"),
    ({"space": {"embedding_dim": ("choice", [16]), "units": ("choice", [8])}},
     r"unknown parameter\(s\) in the search space: \['units'\]"),
    ({"space": {"max_len": ("choice", [16, 32])}}, "unknown parameter"),
    ({"metric": "test_mcc"}, "no trial reports the metric 'test_mcc'"),
    ({"metric": "val_f1"}, "no trial reports the metric 'val_f1'"),
    ({"space": {"dropout": ("normal", 0.1, 0.5)}}, "unknown kind 'normal'"),
    ({"epochs": 2, "grace_period": 3}, "grace_period must be in 1..epochs"),
    ({"num_samples": 0}, "num_samples must be at least 1"),
    ({"config": {"lstm_unit": 3}}, "unknown config keys"),
])
def test_bad_input_fails_before_any_trial(tmp_path, kw, msg):
    import ray
    s = get_settings(lake=str(tmp_path / "lake"), mlflow_tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(TuneError, match=msg):
        search(s, **kw)
    assert not ray.is_initialized()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "lake").exists()


def test_resume_of_an_unknown_search(tmp_path):
    s = get_settings(lake=str(tmp_path / "lake"), mlflow_tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(TuneError, match="no search 'nope' to resume"):
        search(s, name="nope", resume=True)


def test_default_space_is_the_roadmaps():
    ps = param_space(SEARCH_SPACE)
    assert ps["embedding_dim"].categories == [16, 32, 64] and ps["lstm_units"].categories == [20, 50, 100]
    assert ps["batch_size"].categories == [16, 32, 64]
    assert (ps["dropout"].lower, ps["dropout"].upper) == (0.1, 0.5)
    assert param_space({"learning_rate": ("grid", [1e-3, 1e-2])})["learning_rate"] == {"grid_search": [1e-3, 1e-2]}
    assert metric_mode("val_loss") == "min" and metric_mode("val_mcc") == "max"


def test_tunable_metrics_are_what_fit_model_reports_on_validation():
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype("int64")
    df = pd.DataFrame({"message_id": [f"{i:016x}" for i in range(300)], "label": np.where(y, "spam", "ham"),
                       "clean_text": np.where(y, "win cash prize", "see you later"), "y": y})
    c = DEFAULT_CONFIG | {"max_len": 8, "embedding_dim": 4, "lstm_units": 4, "epochs": 1}
    seen = []
    fit_model(c, prepare_data(split_frame(df), c), report=seen.append)
    assert set(METRICS) <= set(seen[0]) and all(k.startswith("val_") for k in METRICS)


def test_trials_never_see_the_test_split(pipeline_lake):
    data, parts = _prepare(Lake.from_settings(pipeline_lake), 600, 42, DEFAULT_CONFIG | TINY)
    assert {"x_train", "y_train", "x_val", "y_val"} <= set(data)
    assert not [k for k in data if k.endswith("_test")] and len(parts["test"]) > 0


# --- a real search ------------------------------------------------------------------------------------------------

def test_search_with_a_crashing_trial_and_asha_stops(tracked, ray_cluster):
    """Four trials, one at a time: lstm_units=-1 makes Keras raise (two crashes); the learning rate 1e-9 cannot learn,
    so ASHA stops that trial at its first rung behind the good one."""
    space = {"learning_rate": ("grid", [0.01, 1e-9]), "lstm_units": ("grid", [8, -1]), "batch_size": ("choice", [16]),
             "embedding_dim": ("choice", [8, 16]), "dropout": ("uniform", 0.1, 0.3)}
    name = f"t-{uuid.uuid4().hex[:8]}"
    rep = search(tracked, space=space, num_samples=1, epochs=3, grace_period=1, reduction_factor=2, concurrency=1,
                 sample_n=1500, name=name, config=TINY, recall_floor=0.0)
    t = rep.table
    assert rep.trials == 4 and rep.errored == 2 and (t.status == "ERROR").sum() == 2
    assert set(t[t.status == "ERROR"].lstm_units) == {-1} and t[t.status == "ERROR"].error.str.contains("units").all()
    good = t[(t.lstm_units == 8) & (t.learning_rate == 0.01)].iloc[0]
    bad = t[(t.lstm_units == 8) & (t.learning_rate == 1e-9)].iloc[0]
    assert good.epochs == 3 and good.stopped_early == 0  # ran its whole budget
    assert bad.epochs == 1 and bad.stopped_early == 1  # stopped by ASHA at the first rung
    assert rep.stopped_early == 1 and rep.epochs_run == 4 and rep.epochs_budget == 12
    assert rep.best_config["learning_rate"] == 0.01 and rep.best_config["lstm_units"] == 8
    assert rep.best_value == pytest.approx(good.val_loss)
    # MLflow: the parent, one FINISHED or FAILED nested run per trial with per-epoch metrics, the winner nested too
    client = mlflow.MlflowClient()
    parent = client.get_run(rep.parent_run_id)
    m = parent.data.metrics
    assert parent.info.status == "FINISHED"
    assert (m["trials_run"], m["trials_errored"], m["trials_stopped_early"]) == (4, 2, 1) and m["wall_seconds"] > 0
    assert parent.data.params["best.learning_rate"] == "0.01" and parent.data.params["metric"] == "val_loss"
    trials = _children(client, rep.parent_run_id)
    assert sorted(r.info.status for r in trials) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]
    epochs = sorted(len(client.get_metric_history(r.info.run_id, "val_loss"))
                    for r in trials if r.info.status == "FINISHED")
    assert epochs == [1, 3]
    assert all({"embedding_dim", "lstm_units", "dropout", "batch_size"} <= set(r.data.params) for r in trials)
    arts = ({a.path for a in client.list_artifacts(rep.parent_run_id)}
            | {a.path for a in client.list_artifacts(rep.parent_run_id, "plots")})
    assert {"best_config.json", "trials.csv", "plots/metric_per_epoch.html", "plots/parallel_coordinates.html"} <= arts
    assert len(rep.figures["metric_per_epoch"].data) == 2
    [winner] = _children(client, rep.parent_run_id, "winner")
    assert winner.info.run_id == rep.winner.run_id and winner.data.params["learning_rate"] == "0.01"
    assert parent.data.tags["winner.version"] == rep.winner.version and "winner_test_mcc" in m
    champ = client.get_model_version_by_alias(tracked.model_name, "champion")
    assert str(champ.version) == rep.winner.version and rep.winner.gate["decision"] == "promoted"
    # the search's state is in the lake, and its name cannot be reused
    assert Lake.from_settings(tracked).exists(f"{TUNE_DIR}/{name}/search.json")
    with pytest.raises(TuneError, match="already exists"):
        search(tracked, name=name)


def _count_finished(uri: str, name: str) -> int:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("spam_detection")
    if exp is None: return 0
    runs = client.search_runs([exp.experiment_id], f"tags.`tune.search` = '{name}' and tags.`tune.role` = 'trial'")
    return sum(r.info.status == "FINISHED" for r in runs)


def test_interrupted_search_resumes_from_the_lake(tracked, ray_cluster):
    """A search of four trials runs in another process; after two trials finish it is interrupted (SIGINT, as a
    stopped Job or Ctrl-C). Resuming it runs the other two only."""
    name = f"r-{uuid.uuid4().hex[:8]}"
    uri = tracked.mlflow_tracking_uri
    code = ("from spam_mlops.config import get_settings; from spam_mlops.tune import search; "
            f"search(get_settings(lake={tracked.lake!r}), "
            "space={'learning_rate': ('grid', [0.01, 0.02, 0.03, 0.04])}, "
            f"num_samples=1, epochs=2, grace_period=2, concurrency=1, sample_n=500, name={name!r}, "
            f"config={TINY!r}, retrain=False, num_cpus=1)")
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        end = time.monotonic() + 400
        while _count_finished(uri, name) < 2 and proc.poll() is None and time.monotonic() < end: time.sleep(0.5)
        assert proc.poll() is None, f"the search ended before it could be interrupted:\n{proc.stdout.read()[-3000:]}"
        assert _count_finished(uri, name) >= 2, "no two trials finished in time"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None: proc.kill()
    assert proc.returncode != 0, out[-3000:]
    done_before = _count_finished(uri, name)
    assert 2 <= done_before < 4, "the interrupt came too late to test resuming"
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("spam_detection").experiment_id
    [parent] = client.search_runs([exp], f"tags.`tune.search` = '{name}' and tags.`tune.role` = 'search'")
    assert parent.info.status == "KILLED"
    finished_first = {r.data.tags["trial_name"] for r in _children(client, parent.info.run_id)
                      if r.info.status == "FINISHED"}

    rep = search(tracked, name=name, resume=True, retrain=False)
    assert rep.trials == 4 and rep.errored == 0 and rep.parent_run_id == parent.info.run_id
    trials = _children(client, parent.info.run_id)
    finished = [r.data.tags["trial_name"] for r in trials if r.info.status == "FINISHED"]
    assert sorted(set(finished)) == sorted(finished) and len(finished) == 4  # each trial finished exactly once
    assert finished_first < set(finished)  # the trials done before the interrupt were kept, not rerun
    assert all(r.info.status in ("FINISHED", "KILLED") for r in trials)  # a trial cut mid-run is closed as KILLED
    p = client.get_run(parent.info.run_id)
    assert p.info.status == "FINISHED" and p.data.metrics["trials_run"] == 4
