"""The drift stage end to end on a real lake, a real MLflow registry (SQLite in tmp) and real training: the baseline is
computed on demand and stored with the model, a quiet window triggers nothing, a drifted window triggers exactly one
retraining whose run and version are in MLflow (through the promotion gate), and the lock works on an S3 API too."""
from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = {"epochs": 1}  # a tiny LSTM: the point is the mechanism, not the model
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """A lake with the pipeline run, the Feast definitions applied (private repo) and a first champion trained
    in-process, MLflow on SQLite in tmp."""
    from spam_mlops.config import get_settings
    from spam_mlops.curate import curate
    from spam_mlops.feature_store import apply
    from spam_mlops.features import features
    from spam_mlops.ingest import ingest
    from spam_mlops.train import train
    tmp = tmp_path_factory.mktemp("drift-retrain")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    shutil.copytree(ROOT / "feature_repo", tmp / "feature_repo", ignore=shutil.ignore_patterns("data", "__pycache__"))
    settings = get_settings(lake=str(tmp / "lake"), source=str(corpus), feature_repo=str(tmp / "feature_repo"),
                            mlflow_tracking_uri=f"sqlite:///{tmp}/mlflow.db", online_store="sqlite")
    for stage in (ingest, curate, features, apply): stage(settings)
    first = train(settings, config=TINY, sample_n=1500, workers=0, recall_floor=0.0)
    assert first.gate["decision"] == "promoted"
    return settings, first


def _client(settings):
    from spam_mlops import registry
    return registry.client(settings.mlflow_tracking_uri)


def _settings():
    "Window of 500 messages; a retraining is a tiny in-process training run (train_workers 0: no Ray)."
    from spam_mlops.config import DriftSettings, RetrainSettings, get_settings
    retrain = get_settings(RetrainSettings, train_config=TINY, train_sample_n=1500)
    # RetrainSettings validates train_workers >= 1; training itself takes 0 for in-process (see train.train)
    return get_settings(DriftSettings, window_messages=500, min_new_labels=60), \
        retrain.model_copy(update={"train_workers": 0})


def _training_runs(settings):
    c = _client(settings)
    exp = c.get_experiment_by_name(settings.experiment)
    return c.search_runs([exp.experiment_id])


def test_quiet_window_no_retraining_and_baseline_stored_with_model(trained):
    from spam_mlops import drift as dr
    from spam_mlops.demo import simulate_traffic
    from spam_mlops.lake import Lake
    from spam_mlops.profile import BASELINE_ARTIFACT, fetch_baseline
    settings, first = trained
    simulate_traffic(settings, n=500, seed=1)
    cfg, retrain = _settings()
    out = dr.drift(settings, cfg, retrain)
    r = out.report
    assert r["status"] == "ok" and not r["decision"]["drift_detected"], [t for t in r["tests"] if t["drifted"]]
    assert r["retraining"]["action"] == "none" and r["baseline"]["model"]["version"] == first.version
    assert r["baseline"]["computed_on_demand"] is False  # training logged it in the model's run
    stored = fetch_baseline(dr.resolve_model(settings), settings.mlflow_tracking_uri)
    assert stored["model"]["run_id"] == first.run_id and stored["rows"]["train"] > 1000
    assert len(stored["text"]["vocabulary"]) > 1000 and 0 < stored["text"]["oov_rate"] < 0.2
    assert set(stored["text_length_quantiles"]) == {"p01", "p05", "p25", "p50", "p75", "p95", "p99"}
    # a model without one (trained before training logged it): computed on demand, the same profile, stored in its run
    run = _client(settings).get_run(first.run_id)
    Path(run.info.artifact_uri.removeprefix("file://"), BASELINE_ARTIFACT).unlink()
    assert fetch_baseline(dr.resolve_model(settings), settings.mlflow_tracking_uri) is None
    rebuilt = dr.load_baseline(settings)
    assert rebuilt["computed_on_demand"] is True and rebuilt["model"] == stored["model"]  # (from the whole frame, not
    assert rebuilt["text"]["vocabulary"] == stored["text"]["vocabulary"]                 # the training's sample)
    assert fetch_baseline(dr.resolve_model(settings), settings.mlflow_tracking_uri)["model"]["run_id"] == first.run_id
    again = dr.drift(settings, cfg, retrain)
    assert again.report["baseline"]["computed_on_demand"] is False
    # the report: lake (JSON + HTML) and an MLflow run of the drift experiment
    lake = Lake.from_settings(settings)
    assert lake.read_json(dr.LATEST)["id"] == again.report["id"]
    assert lake.exists(f"{dr.REPORTS}/{again.report['id']}.html")
    c = _client(settings)
    run = c.get_run(again.report["mlflow_run_id"])
    assert run.data.tags["status"] == "ok" and "text_length.psi" in run.data.metrics
    assert {a.path for a in c.list_artifacts(run.info.run_id)} >= {"drift_report.json", "drift_report.html"}
    assert len(_training_runs(settings)) == 1


def test_drifted_window_waits_for_labels_then_triggers_exactly_one_retraining(trained):
    import pandas as pd

    from spam_mlops import drift as dr
    from spam_mlops.demo import campaign, simulate_traffic
    from spam_mlops.lake import Lake
    from spam_mlops.predlog import FEEDBACK, feedback_frame
    from spam_mlops.tables import Table
    settings, first = trained
    simulate_traffic(settings, n=600, foreign=True, seed=2)
    cfg, retrain = _settings()
    waiting = dr.drift(settings, cfg, retrain)  # drift, but no labels since the champion's data: nothing starts
    assert waiting.status == "waiting_for_labels" and waiting.report["decision"]["drift_detected"]
    assert waiting.report["message"] == "drift detected, waiting for labels: 0 of 60"
    assert waiting.report["retraining"]["action"] == "waiting" and len(_training_runs(settings)) == 1
    assert _client(settings).get_model_version(settings.model_name, first.version).tags["data.feedback_version"] \
        == "none"  # the champion was trained before any feedback
    rows = [line.split("\t", 1) for line in campaign(120, 8).decode().splitlines()]
    labels = pd.DataFrame(rows, columns=["label", "text"]).drop_duplicates("text")
    fv = Table(Lake.from_settings(settings), FEEDBACK).append(feedback_frame(labels, "import"))
    out = dr.drift(settings, cfg, retrain)
    r = out.report
    assert r["decision"]["drift_detected"] and r["decision"]["groups"]["text"], r["decision"]
    assert r["labels"]["new"] == len(labels) >= 60
    rt = r["retraining"]
    assert rt["action"] == "finished" and rt["version"] == str(int(first.version) + 1), rt
    assert rt["data"]["feedback"] == fv and rt["rows"]["feedback"] > 0  # the retrain report names its table versions
    assert f"feedback v{fv}" in str(out)
    # visible in MLflow: a second training run, a new registered version that went through the gate
    runs = _training_runs(settings)
    assert len(runs) == 2
    new = next(x for x in runs if x.info.run_id == rt["run_id"])
    assert new.info.status == "FINISHED" and new.data.tags["registered_version"] == rt["version"]
    assert new.data.tags["gate.decision"] == rt["gate"]
    assert rt["gate"] == "promoted" or rt["gate"].startswith("rejected: "), rt["gate"]
    versions = _client(settings).search_model_versions(f"name='{settings.model_name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    # drift persists: the next runs report it but start nothing, even a minute later: a promoted champion was
    # trained on those labels (waiting for new ones), a refused one leaves the old champion (cool-down)
    later = dr.drift(settings, cfg, retrain, now=datetime.now(UTC) + timedelta(minutes=1))
    lr = later.report["retraining"]
    assert later.report["decision"]["drift_detected"], later.report["decision"]
    if rt["gate"] == "promoted":
        assert lr["action"] == "waiting" and lr["reason"] == "drift detected, waiting for labels: 0 of 60", lr
    else: assert lr["action"] == "skipped" and "cool-down" in lr["reason"], lr
    assert len(_training_runs(settings)) == 2
    assert len(_client(settings).search_model_versions(f"name='{settings.model_name}'")) == 2


def test_lock_on_s3_lake(s3_env):
    from spam_mlops import retrain as rt
    from spam_mlops.config import get_settings
    from spam_mlops.lake import Lake
    lake = Lake.from_settings(get_settings(lake="s3://drift-lock-test/lake"))
    now = datetime.now(UTC)
    assert rt.acquire_lock(lake, "a", now, 6) == (True, "")
    ok, why = rt.acquire_lock(lake, "b", now, 6)
    assert not ok and "lock by a" in why
    ok, note = rt.acquire_lock(lake, "c", now + timedelta(hours=7), 6)
    assert ok and "stale" in note
    rt.release_lock(lake)
    assert not lake.exists(rt.LOCK)
