"""The monitoring stack against the real system: a real Prometheus (Debian's `prometheus`) loads
monitoring/alert-rules.yaml and scrapes the running Ray Serve API's metrics endpoint and a real Pushgateway (Debian's
`prometheus-pushgateway`); traffic goes through the API (whose prediction log lands in the lake), the drift stage
runs on that log and pushes its scores, decision and feedback accuracy; then every Grafana panel query, every alert
expression and every Argo Rollouts analysis query runs against Prometheus's HTTP API.

Expectations, stated per query: every query must succeed. Panels and analysis queries must return data. Alert
expressions return data only when their condition holds; here the window is foreign text (drift detected) and the
feedback says the model is wrong 1 time in 5 after a first push at 100 %, so SpamDriftDetected, SpamModelAccuracyLow and
SpamModelAccuracyDropping return data, while SpamApiHighErrorRate (no 5xx was caused), SpamApiNoPredictions (traffic
flows) and SpamDriftJobStale (the drift job just ran) return nothing — for those the series they compare is checked to
have data instead. SpamApiHighLatencyP95 depends on this machine's load and may go either way. One panel is a known
gap of the API's metrics, marked xfail: "Model version served" (see MODEL_INFO_GAP)."""
from __future__ import annotations

import json
import re
import shutil
import sys
import time

import pytest
import requests
import yaml
from support import (
    ROOT,
    ManagedServer,
    demo_model,
    free_port,
    pipeline_settings,
    prom_query,
    prometheus_server,
    pushgateway_server,
    wait_until,
)
from support.monitoring import analysis_queries

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RULES = ROOT / "monitoring" / "alert-rules.yaml"
DASHBOARDS = sorted((ROOT / "monitoring" / "grafana" / "dashboards").glob("*.json"))
CANARY_HASH = "6d5f8c7b9"
ALERT_EXPECT = {"SpamApiHighErrorRate": "empty", "SpamApiHighLatencyP95": "any", "SpamApiNoPredictions": "empty",
                "SpamDriftDetected": "data", "SpamDriftJobStale": "empty", "SpamModelAccuracyLow": "data",
                "SpamModelAccuracyDropping": "data"}


CLIENT = """
import json, sys, time, requests
import pydoc_data.topics as t
url, out = sys.argv[1], sys.argv[2]
texts = [s.strip() for s in " ".join(t.topics.values()).split(". ") if 20 < len(s.strip()) < 300][:300]
counts, i, last = {}, 0, 0.0
with requests.Session() as s:
    while True:
        for body in ([{"text": texts[i % len(texts)]}] + ([{"text": "   "}] if i % 10 == 0 else [])):  # and a 422
            try: k = str(s.post(url + "/api/predict", json=body, timeout=30).status_code)
            except requests.RequestException as e: k = type(e).__name__
            counts[k] = counts.get(k, 0) + 1
        i += 1
        if time.time() - last > 1:
            open(out + ".tmp", "w").write(json.dumps(counts))
            __import__("os").replace(out + ".tmp", out)
            last = time.time()
        time.sleep(0.05)
"""


@pytest.fixture(scope="module")
def api(tmp_path_factory, corpus):
    "The Ray Serve API (HAProxy ingress) over a small demo model, logging predictions to a lake with the pipeline run."
    from spam_mlops import serve as sv
    from spam_mlops.curate import read_curated
    from spam_mlops.lake import Lake
    from spam_mlops.service import ServeConfig
    tmp = tmp_path_factory.mktemp("prom")
    settings = pipeline_settings(tmp / "lake", corpus, mlflow_tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    df = read_curated(Lake.from_settings(settings)).sample(1000, random_state=0)
    model = demo_model(df.text, (df.label == "spam").astype(int), epochs=1)
    model.save(tmp / "demo.keras")
    port, metrics_port = free_port(), free_port()
    cfg = ServeConfig.from_settings(settings, model_uri=str(tmp / "demo.keras"), poll_s=0, log_flush_s=1.0, api_keys=())
    for attempt in range(3):  # Ray gives its raylet a fixed 30 s to register: a loaded machine may need more tries
        try:
            sv.start_server(sv.deployment(cfg), port=port, host="127.0.0.1", metrics_port=metrics_port, num_cpus=2)
            break
        except Exception as e:
            import ray
            ray.shutdown()
            if "timed out during startup" not in str(e) or attempt == 2: raise
    try:
        wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).ok, 180, "the API ready")
        yield {"url": f"http://127.0.0.1:{port}", "metrics_port": metrics_port, "settings": settings, "model": model,
               "tmp": tmp}
    finally: sv.stop_server()


@pytest.fixture(scope="module")
def pushgateway(tmp_path_factory):
    "A real Pushgateway; yields its URL."
    with pushgateway_server(tmp_path_factory.mktemp("pushgateway")) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def prometheus(api, pushgateway, tmp_path_factory):
    "A real Prometheus with the repository's rules, scraping the API (as the canary revision) and the Pushgateway."
    tmp = tmp_path_factory.mktemp("prometheus")
    rules = tmp / "alert-rules.yaml"
    shutil.copy(RULES, rules)
    api_target = {"targets": [f"127.0.0.1:{api['metrics_port']}"],
                  "labels": {"pod": "spam-api-test-0", "rollouts_pod_template_hash": CANARY_HASH}}
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(rules)],
              "scrape_configs": [
                  {"job_name": "spam-api", "static_configs": [api_target]},
                  {"job_name": "pushgateway", "honor_labels": True,
                   "static_configs": [{"targets": [pushgateway.removeprefix("http://")]}]}]}
    with prometheus_server(tmp, config) as srv:
        yield srv.url



def wait_data(prom: str, expr: str, timeout: float = 90) -> list:
    "The result of `expr` once it holds at least one number (NaN, e.g. 0/0 of a rate without traffic, is no data)."
    end = time.time() + timeout
    while time.time() < end:
        res = prom_query(prom, expr)
        if any(x["value"][1] not in ("NaN", "+Inf", "-Inf") for x in res): return res
        time.sleep(1)
    raise AssertionError(f"{expr}: no data after {timeout} s: {res}")


def panel_queries() -> list[tuple[str, str]]:
    out = []

    def walk(panels, where):
        for p in panels:
            out.extend((f"{where}/{p.get('title')}", t["expr"]) for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []), where)
    for f in DASHBOARDS: walk(json.loads(f.read_text())["panels"], f.name)
    return out


# Series this module cannot produce: the platform alerts read kube-state-metrics and the kubelet, the canary's edge
# metrics read the ingress controller. tests/integration/test_alerting.py and test_canary_analysis.py run those on
# recorded series in a real Prometheus; here every other alert and query runs on the API's and the drift job's own.
PLATFORM_GROUP = "spam-mlops.platform"


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] if g["name"] != PLATFORM_GROUP
            for r in g["rules"] if "alert" in r]


def recorded_series(expr: str) -> set[str]:
    "The recorded series (level:metric:operations names) an expression reads."
    return set(re.findall(r"\b[a-z_]+(?::[a-z0-9_]+)+\b", expr))


@pytest.fixture(scope="module")
def traffic(api, prometheus, pushgateway):
    "Requests through the API (a client process keeps them flowing), then the drift stage on the logged window."
    from spam_mlops.config import DriftSettings, RetrainSettings, get_settings
    from spam_mlops.demo import foreign_texts
    from spam_mlops.drift import drift
    from spam_mlops.lake import Lake
    from spam_mlops.model import predict_texts
    from spam_mlops.predlog import read_predictions, write_feedback
    from spam_mlops.profile import model_vocabulary, profile_from_parts
    from spam_mlops.train import split_frame, training_frame
    url = api["url"]
    foreign = foreign_texts(400, seed=5)
    counts = api["tmp"] / "client-counts.json"
    # a separate process keeps requests flowing for the whole module (the 2- and 5-minute rates need a steady
    # stream; threads of this process stall while it holds the GIL in Ray's and TensorFlow's C code)
    client = ManagedServer([sys.executable, "-c", CLIENT, url, counts], ready=lambda: True,
                           log=api["tmp"] / "client.log", name="traffic client").start()
    try:
        for i in range(0, 400, 100):
            r = requests.post(f"{url}/api/predict/batch", json={"texts": foreign[i:i + 100]}, timeout=30)
            assert r.ok, r.text
        # the baseline: the same profile the drift stage stores with a model, here for the served demo model
        settings = api["settings"]
        lake = Lake.from_settings(settings)
        m = api["model"]
        parts = split_frame(training_frame(lake=lake, source="lake"))
        profile = profile_from_parts(parts, model_vocabulary(m), lambda x: predict_texts(m, x),
                                     model={"name": "demo", "version": "demo.keras", "run_id": None})
        end = time.time() + 60
        while time.time() < end and len(read_predictions(lake, hours=1)[0]) < 400: time.sleep(1)
        logged, _ = read_predictions(lake, hours=1)
        assert len(logged) >= 400
        cfg = get_settings(DriftSettings, window_hours=1, min_messages=100, pushgateway=pushgateway, min_feedback=20)
        off = get_settings(RetrainSettings, mode="off")
        # feedback, first all correct (accuracy 1.0), pushed; then 1 in 5 wrong (0.8), pushed again
        once = logged.drop_duplicates("message_id").head(100)
        ids, preds = once.message_id.tolist(), once.prediction.tolist()
        write_feedback(lake, ids, preds)
        first = drift(settings, cfg, off, profile=profile, mlflow_log=False)
        assert first.report["accuracy"]["accuracy"] == 1.0 and first.report.get("pushed") == pushgateway
        wait_data(prometheus, "spam_model:accuracy == 1")
        flipped = [("ham" if p == "spam" else "spam") if i % 5 == 0 else p for i, p in enumerate(preds)]
        write_feedback(lake, ids, flipped)
        second = drift(settings, cfg, off, profile=profile, mlflow_log=False)
        assert second.report["accuracy"]["accuracy"] == pytest.approx(0.8)
        assert second.report["decision"]["drift_detected"]
        assert second.report["retraining"] == {"action": "disabled"}
        wait_data(prometheus, "spam_model:accuracy < 0.9")
        wait_data(prometheus, "spam_api:requests:rate5m")
        wait_data(prometheus, "spam_api:model_version:replicas")
        wait_data(prometheus, "spam_api:latency_seconds_by_revision:p95_2m")
        wait_data(prometheus, "spam_api:error_ratio_by_revision:rate2m")
        wait_until(lambda: counts.exists() or not client.running, 30, "the client's first counts")
        sent = json.loads(counts.read_text())
        assert sent.get("200", 0) > 20 and sent.get("422", 0) > 2, sent
        yield {"report": second.report}
    finally:
        client.stop()
    sent = json.loads(counts.read_text())
    assert set(sent) <= {"200", "422"}, sent  # no 5xx and no client error during the whole module


def test_targets_up_and_rules_healthy(prometheus, traffic):
    targets = requests.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert {t["labels"]["job"]: t["health"] for t in targets} == {"spam-api": "up", "pushgateway": "up"}, targets
    groups = requests.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
    unhealthy = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not unhealthy, unhealthy


def test_drift_metrics_pushed(prometheus, traffic):
    tests = traffic["report"]["tests"]
    got = {(x["metric"]["feature"], x["metric"]["test"]) for x in wait_data(prometheus, "spam_drift:score")}
    assert got == {(t["feature"], t["test"]) for t in tests}
    assert float(prom_query(prometheus, "spam_drift:detected")[0]["value"][1]) == 1.0
    assert float(prom_query(prometheus, "spam_drift:seconds_since_last_run")[0]["value"][1]) < 600


# Known gap (serve module): Ray's metrics agent drops a gauge ~30 s after its last `set`, and the API sets
# spam_api_model_info only when a model is loaded or replaced: the "Model version served" panel is empty
# whenever the model has not changed in the last half minute. The fix is in spam_mlops.serve (re-set the gauge
# periodically); until then this panel is an expected failure, reported as XPASS if it ever returns data.
MODEL_INFO_GAP = ("ray drops ray_spam_api_model_info ~30 s after the API set it once "
                  "(see spam_mlops.serve Metrics.model)")


def _panel_params():
    gap = pytest.mark.xfail(reason=MODEL_INFO_GAP, strict=False)
    return [pytest.param(w, e, marks=gap) if "model_version:replicas" in e else pytest.param(w, e)
            for w, e in panel_queries()]


@pytest.mark.parametrize("where,expr", _panel_params())
def test_every_dashboard_panel_returns_data(prometheus, traffic, where, expr):
    assert wait_data(prometheus, expr, timeout=30), where


@pytest.mark.parametrize("name,expr", analysis_queries(CANARY_HASH))
def test_every_canary_analysis_query_returns_data(prometheus, traffic, name, expr):
    res = wait_data(prometheus, expr, timeout=30)
    assert len(res) == 1 and float(res[0]["value"][1]) >= 0, (name, res)


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_every_alert_expression(prometheus, traffic, rule):
    expect = ALERT_EXPECT.get(rule["alert"], "any")
    if expect == "data":
        wait_data(prometheus, rule["expr"], timeout=30)
        return
    res = prom_query(prometheus, rule["expr"])
    if expect == "empty":
        assert res == [], f"{rule['alert']} holds unexpectedly: {res}"
    series = recorded_series(rule["expr"])
    assert series, rule["expr"]
    for name in series:
        assert prom_query(prometheus, name), f"{rule['alert']}: {name} has no data, so the alert could never fire"


def test_drift_alert_fires(prometheus, traffic):
    "SpamDriftDetected has no `for`: it is firing as soon as the rule is evaluated on the pushed decision."
    end = time.time() + 30
    while time.time() < end:
        alerts = requests.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        if any(a["labels"]["alertname"] == "SpamDriftDetected" and a["state"] == "firing" for a in alerts): return
        time.sleep(1)
    raise AssertionError(f"SpamDriftDetected not firing: {alerts}")
