"""Unit tests of spam_mlops.drift and spam_mlops.retrain on a real lake folder: windows, tests, decision, bad input,
feedback accuracy, the retraining guard and the RayJob the drift job would create in a cluster (checked offline)."""
from __future__ import annotations

import importlib.util
import json
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from support import free_port

from spam_mlops import drift as dr
from spam_mlops import predlog
from spam_mlops import retrain as rt
from spam_mlops.config import ConfigError, DriftSettings, RetrainSettings, get_settings
from spam_mlops.curate import clean_text
from spam_mlops.demo import foreign_texts, sms_like
from spam_mlops.features import compute_features
from spam_mlops.lake import Lake
from spam_mlops.predlog import prediction_table
from spam_mlops.profile import profile_from_parts
from spam_mlops.tables import Table

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 3, 4, 12, 0, tzinfo=UTC)


def _keyword_model(clean):
    spammy = ("win", "won", "free", "claim", "prize", "xphone")
    return np.array([0.9 if any(w in s.split() for w in spammy) else 0.1 for s in clean])


def _frame(df):
    out = pd.concat([df.reset_index(drop=True), compute_features(df.text).reset_index(drop=True)], axis=1)
    out["clean_text"] = clean_text(out.text.astype(object)).astype(str)
    return out


@pytest.fixture(scope="module")
def profile():
    parts = {"train": _frame(sms_like(2000, 1)), "val": _frame(sms_like(400, 2))}
    vocab = sorted({t for s in parts["train"].clean_text for t in s.split()})
    return profile_from_parts(parts, vocab, _keyword_model, model={"name": "demo", "version": "7", "run_id": None})


def _rows(texts, start, minutes=60.0, version="7"):
    p = _keyword_model(clean_text(pd.Series(list(texts), dtype=object)).tolist())
    ts = [start + timedelta(seconds=minutes * 60 * i / len(p)) for i in range(len(p))]
    return prediction_table([(t, uuid.uuid4().hex, x, float(q), "spam" if q >= .5 else "ham", version)
                             for t, x, q in zip(ts, texts, p, strict=True)])


@pytest.fixture
def env(tmp_path):
    s = get_settings(lake=str(tmp_path / "lake"), mlflow_tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    return s, Lake.from_settings(s)


def _put(lake, df, name, day=NOW):
    "Append rows to the lake's predictions table (`name` and `day` kept for the callers: the rows carry their dt)."
    return predlog.write_predictions(lake, df)


def drift_cfg(**kw) -> DriftSettings:
    "The drift settings of these tests (a 3-hour window, 200 messages at least), plus `kw`."
    return get_settings(DriftSettings, **({"window_hours": 3, "min_messages": 200, "min_new_labels": 0} | kw))


def retrain_cfg(**kw) -> RetrainSettings:
    return get_settings(RetrainSettings, **kw)


CFG, RETRAIN = drift_cfg(), retrain_cfg()


def test_settings_from_env(monkeypatch):
    "The stage's two sections, read from their own variables; a bad value names the variable."
    monkeypatch.setenv("SPAM_MLOPS_DRIFT_WINDOW_MESSAGES", "750")
    monkeypatch.setenv("SPAM_MLOPS_RETRAIN_MODE", "kubernetes")
    monkeypatch.setenv("SPAM_MLOPS_PUSHGATEWAY_URL", "http://pushgateway:9091")
    monkeypatch.setenv("SPAM_MLOPS_RETRAIN_TUNE", "yes")
    c, r = get_settings(DriftSettings, min_messages=50), get_settings(RetrainSettings)
    assert (c.window_messages, c.pushgateway, c.min_messages) == (750, "http://pushgateway:9091", 50)
    assert (r.mode, r.tune) == ("kubernetes", True)
    monkeypatch.setenv("SPAM_MLOPS_RETRAIN_TUNE", "maybe")
    with pytest.raises(ConfigError, match="SPAM_MLOPS_RETRAIN_TUNE"): get_settings(RetrainSettings)
    monkeypatch.setenv("SPAM_MLOPS_RETRAIN_TUNE", "0")
    monkeypatch.setenv("SPAM_MLOPS_RETRAIN_TRAIN_CONFIG", "{not json")
    with pytest.raises(ConfigError, match="SPAM_MLOPS_RETRAIN_TRAIN_CONFIG"): get_settings(RetrainSettings)
    monkeypatch.delenv("SPAM_MLOPS_RETRAIN_TRAIN_CONFIG")
    with pytest.raises(ConfigError, match="SPAM_MLOPS_RETRAIN_MODE"): get_settings(RetrainSettings, mode="cluster")


def test_window_by_hours_and_by_messages(env):
    _, lake = env
    _put(lake, _rows(sms_like(50, 1).text, NOW - timedelta(days=1, hours=5)), "old", NOW - timedelta(days=1))
    _put(lake, _rows(sms_like(100, 2).text, NOW - timedelta(hours=2)), "a")
    _put(lake, _rows(sms_like(100, 3).text, NOW - timedelta(minutes=50), minutes=40), "b")
    w, info = predlog.read_predictions(lake, hours=3, now=NOW)
    assert len(w) == 200 and info["files"] == 1 and w.timestamp.is_monotonic_increasing  # one day partition
    w, _ = predlog.read_predictions(lake, hours=48, now=NOW)
    assert len(w) == 250
    w, _ = predlog.read_predictions(lake, last_n=120, now=NOW)
    assert len(w) == 120 and w.timestamp.min() >= NOW - timedelta(hours=2)
    last = pd.Timestamp(NOW - timedelta(minutes=50) + timedelta(minutes=40 * 99 / 100))
    assert w.timestamp.is_monotonic_increasing and w.timestamp.max() == last


def test_quiet_and_drifted_windows(profile):
    quiet = dr.run_tests(_rows(sms_like(500, 11).text, NOW), profile, CFG)
    assert not dr.decide(quiet, CFG)["drift_detected"]
    assert {t["test"] for t in quiet} >= {"psi", "ks", "chi2", "oov_rate_delta", "js", "spam_rate_delta"}
    foreign = dr.run_tests(_rows(foreign_texts(500, 11), NOW), profile, CFG)
    d = dr.decide(foreign, CFG)
    assert d["drift_detected"] and d["groups"]["text"] and d["groups"]["feature"]
    assert "text_length" in d["drifted_features"]
    # prediction drift alone: same texts, but the model now says spam for everything
    w = _rows(sms_like(500, 12).text, NOW).assign(spam_probability=0.95, prediction="spam")
    d = dr.decide(dr.run_tests(w, profile, CFG), CFG)
    assert {g: d["groups"][g] for g in ("feature", "text", "prediction")} == {"feature": False, "text": False,
                                                                             "prediction": True}
    # no logged text (SPAM_MLOPS_LOG_TEXT=false): text tests skipped and said so
    d = dr.decide(dr.run_tests(w.assign(text=None), profile, CFG), CFG)
    assert d["skipped_groups"] == ["text"]


@pytest.mark.parametrize("case", ["empty_window", "too_few_messages", "corrupt_predictions"])
def test_bad_input_reports_status_and_retrains_nothing(env, profile, case):
    settings, lake = env
    calls = []
    if case == "too_few_messages": _put(lake, _rows(sms_like(150, 1).text, NOW - timedelta(hours=1)), "a")
    if case == "corrupt_predictions":  # a data file of the predictions table damaged
        _put(lake, _rows(foreign_texts(400, 1), NOW - timedelta(hours=1)), "a")  # drifted: would retrain if tested
        data = [f for f in lake.list("tables/predictions/") if f.endswith(".parquet")]
        lake.write_bytes(data[0], b"PAR1 truncated")
    with pytest.raises(dr.DriftInputError) as e:
        dr.drift(settings, CFG, RETRAIN, NOW, profile=profile, run_local=lambda s, c: calls.append(1), mlflow_log=False)
    status = case
    assert e.value.status == status and "report:" in str(e.value)
    rep = lake.read_json(dr.LATEST)
    assert rep["status"] == status and rep["message"] and "tests" not in rep and "retraining" not in rep and not calls
    assert Path(rep["paths"]["html"]).read_text().count(status) >= 1
    if status == "corrupt_predictions": assert "tables/predictions" in rep["window"]["corrupt"][0]["file"]


def test_missing_baseline_when_no_model_is_registered(env):
    settings, lake = env
    _put(lake, _rows(sms_like(300, 1).text, NOW - timedelta(hours=1)), "a")
    with pytest.raises(dr.DriftInputError, match="missing_baseline: no registered model"):
        dr.drift(settings, CFG, RETRAIN, NOW, mlflow_log=False)
    assert lake.read_json(dr.LATEST)["status"] == "missing_baseline"


def test_drift_triggers_exactly_one_retraining(env, profile):
    settings, lake = env
    calls, cfg = [], drift_cfg(window_hours=12)
    trainer = lambda s, c: calls.append(c) or {"run_id": "r", "version": "8", "gate": "promoted"}
    _put(lake, _rows(foreign_texts(400, 2), NOW - timedelta(hours=1)), "a")
    first = dr.drift(settings, cfg, RETRAIN, NOW, profile=profile, run_local=trainer, mlflow_log=False)
    assert first.report["retraining"]["action"] == "finished" and first.report["retraining"]["version"] == "8"
    second = dr.drift(settings, cfg, RETRAIN, NOW + timedelta(hours=1), profile=profile, run_local=trainer,
                      mlflow_log=False)
    assert second.report["decision"]["drift_detected"] and "cool-down" in second.report["retraining"]["reason"]
    assert len(calls) == 1 and "DRIFT" in str(second)
    state = lake.read_json(rt.STATE)
    assert state["last_report"] == first.report["id"] and state["running"] is False and not lake.exists(rt.LOCK)
    rejected = lambda s, c: calls.append(1) or {"run_id": "r", "version": "9", "gate": "rejected"}
    failing = dr.drift(settings, cfg, retrain_cfg(cooldown_hours=0.5), NOW + timedelta(hours=2), profile=profile,
                       run_local=rejected, mlflow_log=False)
    assert failing.report["retraining"]["gate"] == "rejected" and len(calls) == 2
    with pytest.raises(dr.DriftError, match="retraining failed: RuntimeError: boom"):
        dr.drift(settings, cfg, retrain_cfg(cooldown_hours=0), NOW + timedelta(hours=3), profile=profile,
                 run_local=lambda s, c: (_ for _ in ()).throw(RuntimeError("boom")), mlflow_log=False)
    assert lake.read_json(dr.LATEST)["status"] == "retrain_failed" and not lake.exists(rt.LOCK)


def test_drift_waits_for_new_labels_then_retrains(env, profile):
    """Drift with too few labels since the champion's data: a report that waits (and says so), no retraining; then
    enough labels (from outside the API, with their text): the retraining starts."""
    from prometheus_client import generate_latest
    settings, lake = env
    calls, cfg = [], drift_cfg(window_hours=12, min_new_labels=30)
    trainer = lambda s, c: calls.append(c) or {"run_id": "r", "version": "8", "gate": "promoted"}
    _put(lake, _rows(foreign_texts(400, 2), NOW - timedelta(hours=1)), "a")
    wait = dr.drift(settings, cfg, RETRAIN, NOW, profile=profile, run_local=trainer, mlflow_log=False)
    assert wait.status == "waiting_for_labels" and wait.report["decision"]["drift_detected"] and calls == []
    assert wait.report["message"] == "drift detected, waiting for labels: 0 of 30"
    assert wait.report["retraining"] == {"action": "waiting", "reason": "drift detected, waiting for labels: 0 of 30"}
    assert "waiting for labels: 0 of 30" in str(wait) and not lake.exists(rt.STATE)
    text = generate_latest(dr.metrics_registry(wait.report)).decode()
    assert "spam_drift_waiting_for_labels 1.0" in text and "spam_drift_new_labels 0.0" in text
    assert "spam_drift_labels_needed 30.0" in text and "spam_drift_detected 1.0" in text  # the alert's gauge
    texts = foreign_texts(80, 9)
    labels = pd.DataFrame({"text": texts, "label": ["ham"] * len(texts)}).drop_duplicates("text")
    Table(lake, predlog.FEEDBACK).append(predlog.feedback_frame(labels, "import", NOW))
    go = dr.drift(settings, cfg, RETRAIN, NOW + timedelta(minutes=5), profile=profile, run_local=trainer,
                  mlflow_log=False)
    assert go.status == "ok" and go.report["retraining"]["action"] == "finished" and len(calls) == 1
    assert go.report["labels"]["new"] == len(labels) >= 30 and go.report["labels"]["needed"] == 30
    assert "spam_drift_waiting_for_labels 0.0" in generate_latest(dr.metrics_registry(go.report)).decode()


def test_lock_is_exclusive_under_concurrency(env):
    _, lake = env
    results = []
    barrier = threading.Barrier(8)

    def take(i):
        barrier.wait()
        results.append(rt.acquire_lock(lake, f"p{i}", NOW, 6)[0])
    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert sorted(results) == [False] * 7 + [True]


def test_feedback_accuracy(env):
    _, lake = env
    logged = _rows(sms_like(60, 4).text, NOW - timedelta(hours=2)).drop_duplicates("message_id").reset_index(drop=True)
    _put(lake, logged, "a")
    truth = logged.prediction.tolist()
    wrong = ["ham" if p == "spam" else "spam" for p in truth]
    predlog.write_feedback(lake, logged.message_id[:30], truth[:30], NOW - timedelta(hours=1))
    predlog.write_feedback(lake, logged.message_id[30:40], wrong[30:40], NOW - timedelta(minutes=30))
    cfg = drift_cfg(min_feedback=20)
    acc = dr.feedback_accuracy(lake, cfg, NOW)
    assert acc["status"] == "ok" and acc["labelled"] == 40 and acc["accuracy"] == pytest.approx(30 / 40)
    assert dr.feedback_accuracy(lake, drift_cfg(min_feedback=41), NOW)["status"] == "too_few_labels"
    # predictions older than the window
    assert dr.feedback_accuracy(lake, drift_cfg(feedback_hours=1), NOW)["labelled"] == 0
    with pytest.raises(predlog.FeedbackError, match="ham or spam"): predlog.write_feedback(lake, ["x"], ["SPAM!"])


def _validator():
    spec = importlib.util.spec_from_file_location("validate_manifests", ROOT / "scripts" / "validate_manifests.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("tune", [False, True])
def test_training_job_from_repo_manifest(tune):
    from kubernetes.client import ApiClient
    cfg = retrain_cfg(manifest=str(ROOT / "k8s" / "base" / "training-job.yaml"), tune=tune)
    name = "spam-tune" if tune else "spam-train"
    template = rt.load_template(cfg, name)
    job = rt.training_job(template, "r1", NOW)
    assert job["metadata"]["name"] == f"{name}-drift-20260304120000" and len(job["metadata"]["name"]) <= 47
    assert job["spec"]["suspend"] is False and job["spec"]["entrypoint"] == template["spec"]["entrypoint"]
    assert job["spec"]["entrypoint"].startswith(f"spam-mlops run {'05' if tune else '04'}")
    assert job["metadata"]["labels"]["spam-mlops/trigger"] == "drift"
    assert job["metadata"]["annotations"] == {"spam-mlops/drift-report": "r1"}
    v = _validator()
    assert v.check_rayjob(job) == [] and v.check_hardening(job) == []
    assert ApiClient().sanitize_for_serialization(job) == json.loads(json.dumps(job))
    with pytest.raises(rt.RetrainError, match="no RayJob named nope"): rt.load_template(cfg, "nope")


class RecordingApi:
    "Stands in for the Kubernetes API server (no cluster here): serves a template and a job list, records creations."

    def __init__(self, template, running=()):
        self.template, self.running, self.created = template, list(running), []

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        assert (group, version, plural, name) == ("ray.io", "v1", "rayjobs", "spam-train")
        return self.template

    def list_namespaced_custom_object(self, group, version, namespace, plural, label_selector=None):
        assert label_selector == "spam-mlops/trigger"
        return {"items": self.running}

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.created.append((namespace, body))
        return body


def test_kubernetes_retraining_creates_one_clean_rayjob(env, profile):
    import yaml
    settings, lake = env
    docs = yaml.safe_load_all((ROOT / "k8s" / "base" / "training-job.yaml").read_text())
    template = next(d for d in docs if d and d["metadata"]["name"] == "spam-train")
    # as the API returns it: server fields, Argo CD's tracking label and kubectl's annotation, a status
    template["metadata"] |= {"namespace": "spam-mlops", "uid": "u-1", "resourceVersion": "42", "managedFields": [{}],
                             "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}}
    template["metadata"]["labels"]["app.kubernetes.io/instance"] = "spam-detection"
    template["status"] = {"jobDeploymentStatus": "Suspended"}
    api = RecordingApi(template)
    k8s = retrain_cfg(mode="kubernetes", namespace="spam-mlops")
    k8s_now = retrain_cfg(mode="kubernetes", namespace="spam-mlops", cooldown_hours=0)
    _put(lake, _rows(foreign_texts(400, 3), NOW - timedelta(hours=1)), "a")
    rep = dr.drift(settings, CFG, k8s, NOW, profile=profile, mlflow_log=False, k8s_api=api)
    assert rep.report["retraining"]["action"] == "started" and len(api.created) == 1
    ns, body = api.created[0]
    assert ns == "spam-mlops" and body["metadata"]["name"] == rep.report["retraining"]["rayjob"]
    assert set(body) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(body["metadata"]) == {"name", "labels", "annotations"}
    assert "app.kubernetes.io/instance" not in body["metadata"]["labels"] and body["spec"]["suspend"] is False
    # a started job still running blocks the next one even after the cool-down
    running = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
    api.running = [{"metadata": {"name": body["metadata"]["name"]}, "status": running}]
    rep = dr.drift(settings, CFG, k8s_now, NOW + timedelta(hours=1), profile=profile, mlflow_log=False, k8s_api=api)
    assert rep.report["retraining"]["action"] == "skipped" and "still running" in rep.report["retraining"]["reason"]
    assert len(api.created) == 1
    api.running[0]["status"] = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
    rep = dr.drift(settings, CFG, k8s_now, NOW + timedelta(hours=2), profile=profile, mlflow_log=False, k8s_api=api)
    assert rep.report["retraining"]["action"] == "started" and len(api.created) == 2


def test_metrics_registry_names(profile):
    from prometheus_client import generate_latest
    tests = dr.run_tests(_rows(foreign_texts(300, 4), NOW), profile, CFG)
    rep = {"tests": tests, "decision": dr.decide(tests, CFG), "finished_at_unix": 1.7e9, "accuracy": {"accuracy": 0.9}}
    text = generate_latest(dr.metrics_registry(rep)).decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert names >= {"spam_drift_score", "spam_drift_detected", "spam_drift_last_run_timestamp_seconds",
                     "spam_model_accuracy", "spam_drift_waiting_for_labels"}
    assert text.count("spam_drift_score{") == len(tests) and "spam_drift_detected 1.0" in text
    assert "spam_drift_last_run_timestamp_seconds 1.7e+09" in text


def test_unexpected_failure_still_leaves_a_report(env, profile):
    settings, lake = env
    _put(lake, _rows(sms_like(300, 5).text, NOW - timedelta(hours=1)), "a")
    broken = {k: v for k, v in profile.items() if k != "text"}  # e.g. a profile written by an older version
    with pytest.raises(dr.DriftError, match="drift failed: KeyError"):
        dr.drift(settings, CFG, RETRAIN, NOW, profile=broken, run_local=lambda s, c: pytest.fail("retrained"),
                 mlflow_log=False)
    rep = lake.read_json(dr.LATEST)
    assert rep["status"] == "error" and "KeyError" in rep["message"] and "retraining" not in rep


def test_unreachable_registry_is_a_missing_baseline(env):
    settings, lake = env
    _put(lake, _rows(sms_like(300, 6).text, NOW - timedelta(hours=1)), "a")
    s = get_settings(lake=settings.lake, mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(dr.DriftInputError, match="missing_baseline: MLflow tracking server .* does not answer"):
        dr.drift(s, CFG, RETRAIN, NOW)
    assert lake.read_json(dr.LATEST)["status"] == "missing_baseline"
