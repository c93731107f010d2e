"""Prometheus rules, scrape configuration, Grafana dashboards and the canary analysis queries.

- promtool (Debian's prometheus package) checks the rules and runs their unit tests with synthetic series;
- the metric-name table at the top of monitoring/alert-rules.yaml is the one place raw metric names
  appear: dashboards, alerts and the AnalysisTemplate use only the recorded series;
- every alert has a runbook_url into a section of the runbook that exists; amtool checks the Alertmanager
  configuration exactly as the overlays render it;
- a real Prometheus scrapes a synthetic exporter of every metric in that table (labels as in the table)
  and evaluates the recording rules; then every dashboard panel's PromQL, every alert expression and
  every canary-analysis query runs against it without error and returns data. (The same queries against
  the real running API are the drift/monitoring issue's integration test.)
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest
import yaml
from support import PROMETHEUS_HINT, ROOT, free_port, prom_query, prometheus_server, require, wait_until
from support.monitoring import ROLLOUT, analysis_queries

MON = ROOT / "monitoring"
RULES = MON / "alert-rules.yaml"
ALERTMANAGER = MON / "alertmanager.yml"
RUNBOOK = ROOT / "nbs" / "explanations" / "runbook.md"
DASHBOARDS = sorted((MON / "grafana" / "dashboards").glob("*.json"))


def need(name: str) -> str:
    "A Debian prometheus binary (see conftest.require)."
    return require(shutil.which(name), name, PROMETHEUS_HINT)


def metric_table() -> dict[str, tuple[str, list[str]]]:
    "name -> (type, labels) from the table at the top of alert-rules.yaml."
    table = {}
    for line in RULES.read_text().splitlines():
        m = re.match(r"#\s*\|\s*([a-z_]+)\s*\|\s*(counter|gauge|histogram)\s*\|\s*([\w, ]*?)\s*\|", line)
        if m: table[m.group(1)] = (m.group(2), [x.strip() for x in m.group(3).split(",") if x.strip()])
    return table


def raw_names() -> set[str]:
    "Every series name the table implies (histograms: _bucket, _sum, _count)."
    names = set()
    for n, (t, _) in metric_table().items():
        names |= {f"{n}_bucket", f"{n}_sum", f"{n}_count"} if t == "histogram" else {n}
    return names


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def recorded() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def panel_queries() -> list[tuple[str, str]]:
    "(dashboard/panel title, expr) of every panel target."
    out = []
    for f in DASHBOARDS:
        for p in json.loads(f.read_text())["panels"]:
            out += [(f"{f.name}/{p['title']}", t["expr"]) for t in p.get("targets", [])]
    return out


def series_names(expr: str) -> set[str]:
    "Metric names an expression reads (identifiers that are not functions, keywords or label names)."
    expr = re.sub(r'"[^"]*"', '""', expr)            # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)             # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)            # ranges
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    funcs = set(re.findall(r"([a-zA-Z_]+)\s*\(", expr))
    keywords = {"sum", "max", "min", "avg", "count", "or", "and", "unless", "bool", "offset", "time", "le"}
    return {w for w in words - funcs - keywords if not re.fullmatch(r"\d+|[eE]", w) and w not in ("Inf", "NaN")}


# ---- promtool -----------------------------------------------------------------------------------------------
def test_promtool_check_rules():
    out = subprocess.run([need("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


def test_promtool_unit_tests():
    out = subprocess.run([need("promtool"), "test", "rules", "alert-rules.test.yaml"], cwd=MON, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_unit_tests_can_fail(tmp_path):
    "A threshold moved in the rules makes the unit tests fail (they test the thresholds, not just syntax)."
    (tmp_path / "alert-rules.yaml").write_text(RULES.read_text().replace("spam_api:error_ratio:rate5m > 0.05",
                                                                           "spam_api:error_ratio:rate5m > 0.5"))
    shutil.copy(MON / "alert-rules.test.yaml", tmp_path)
    out = subprocess.run([need("promtool"), "test", "rules", "alert-rules.test.yaml"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "SpamApiHighErrorRate" in out.stdout + out.stderr


def test_every_required_alert_is_tested():
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert {"SpamApiHighErrorRate", "SpamApiHighLatencyP95", "SpamDriftDetected", "SpamApiNoPredictions",
            "SpamModelAccuracyLow", "SpamModelAccuracyDropping"} <= alerts
    tests = yaml.safe_load((MON / "alert-rules.test.yaml").read_text())["tests"]
    firing = {a["alertname"] for t in tests for a in t.get("alert_rule_test", []) if a["exp_alerts"]}
    silent = {a["alertname"] for t in tests for a in t.get("alert_rule_test", []) if not a["exp_alerts"]}
    assert firing == alerts and silent == alerts, (alerts - firing, alerts - silent)


def test_prometheus_config_is_valid(tmp_path):
    """promtool check config on monitoring/prometheus.yml. Debian's build leaves out Kubernetes service
    discovery, so each kubernetes_sd_configs block is swapped for a static target for the check, and the kubelet
    job's token and CA files (the pod's service account) for files here (the relabelling rules, the jobs and
    everything else are checked as written)."""
    cfg = yaml.safe_load((MON / "prometheus.yml").read_text())
    sd_jobs = []
    for job in cfg["scrape_configs"]:
        if job.pop("kubernetes_sd_configs", None) is not None:
            sd_jobs.append(job["job_name"])
            job["static_configs"] = [{"targets": ["127.0.0.1:1"]}]
    assert set(sd_jobs) == {"spam-api", "ray", "mlflow", "kubelet"}
    # the kubelet job reads the pod's service-account token and CA, which promtool wants to exist: copies here
    kubelet = next(j for j in cfg["scrape_configs"] if j["job_name"] == "kubelet")
    assert kubelet["authorization"]["credentials_file"] == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    (tmp_path / "token").write_text("t")
    (tmp_path / "ca.crt").write_text("")
    kubelet["authorization"]["credentials_file"] = str(tmp_path / "token")
    kubelet["tls_config"]["ca_file"] = str(tmp_path / "ca.crt")
    assert cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    assert {"kube-state-metrics", "kubelet"} <= {j["job_name"] for j in cfg["scrape_configs"]}
    cfg["rule_files"] = [str(RULES)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run([need("promtool"), "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    jobs = yaml.safe_load((MON / "prometheus.yml").read_text())["scrape_configs"]
    api = next(j for j in jobs if j["job_name"] == "spam-api")
    assert {"rollouts_pod_template_hash", "pod"} <= {r.get("target_label") for r in api["relabel_configs"]}


def site_url() -> str:
    "The published docs site (nbs/_quarto.yml website.site-url), ending in '/'."
    url = yaml.safe_load((ROOT / "nbs" / "_quarto.yml").read_text())["website"]["site-url"]
    return url.rstrip("/") + "/"


def runbook_sections() -> dict[str, str]:
    """anchor -> text of that section of the runbook, for every heading: its explicit `{#id}`, else the id pandoc
    (Quarto) derives (lower case, punctuation dropped, spaces to dashes)."""
    out, anchor = {}, None
    for line in RUNBOOK.read_text().splitlines():
        m = re.match(r"#{2,4} (.*?)\s*(?:\{#([\w-]+)\})?\s*$", line)
        if m:
            anchor = m.group(2) or re.sub(r"\s+", "-", re.sub(r"[^\w\s-]", "", m.group(1)).strip().lower())
            out[anchor] = ""
        elif anchor: out[anchor] += line + "\n"
    return out


def test_every_alert_has_a_runbook_url_into_its_runbook_section():
    "runbook_url = the published runbook page + an anchor that exists; that section names the alert."
    page = site_url() + "explanations/runbook.html"
    sections = runbook_sections()
    alerts = [r for r in rules() if "alert" in r]
    assert len({r["alert"] for r in alerts}) >= 14
    for r in alerts:
        url = r.get("annotations", {}).get("runbook_url", "")
        base, _, anchor = url.partition("#")
        assert base == page and anchor, f"{r['alert']}: runbook_url {url!r} is not {page}#<section>"
        assert anchor in sections, f"{r['alert']}: the runbook has no section #{anchor}"
        assert r["alert"] in sections[anchor], f"{r['alert']}: section #{anchor} does not mention it"
    # the check can fail: an anchor that is not a heading of the runbook
    assert "alert-nosuchalert" not in sections and "monitoring" in sections


# ---- Alertmanager -------------------------------------------------------------------------------------------------
sys.path.insert(0, str(ROOT / "scripts"))
import validate_manifests as vm  # noqa: E402


@pytest.fixture(scope="module")
def rendered_alertmanager() -> dict[str, list[dict]]:
    "The alerting objects of every overlay, as kubectl kustomize renders them."
    kubectl = require(vm.find_tool("kubectl"), "kubectl", "run scripts/install-tools.sh")
    return {o: vm.render(o, kubectl) for o in ("local", "prod")}


def _amtool(path) -> subprocess.CompletedProcess:
    return subprocess.run([need("amtool"), "check-config", str(path)], capture_output=True, text=True)


@pytest.mark.parametrize("overlay", ["local", "prod"])
def test_amtool_checks_the_rendered_alertmanager_config(rendered_alertmanager, overlay, tmp_path):
    """amtool check-config on the alertmanager.yml of the ConfigMap the Deployment mounts, as rendered; the
    receiver reads its token from the path where the Deployment mounts the Secret alertmanager-receiver."""
    docs = rendered_alertmanager[overlay]
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "alertmanager")
    spec = dep["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec["volumes"]}
    cm_name = vols["config"]["configMap"]["name"]
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_name)
    text = cm["data"]["alertmanager.yml"]
    assert text == ALERTMANAGER.read_text()
    (tmp_path / "alertmanager.yml").write_text(text)
    out = _amtool(tmp_path / "alertmanager.yml")
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
    cfg = yaml.safe_load(text)
    (hook,) = next(r for r in cfg["receivers"] if r["name"] == cfg["route"]["receiver"])["webhook_configs"]
    token_file = hook["http_config"]["authorization"]["credentials_file"]
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "receiver")
    secret = vols["receiver"]["secret"]
    assert secret["secretName"] == "alertmanager-receiver"
    assert token_file == f"{mount['mountPath']}/{secret['items'][0]['path']}" and secret["items"][0]["key"] == "token"
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in spec["containers"][0]["args"]
    # Prometheus sends to the Service that selects these pods
    svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "alertmanager")
    assert svc["spec"]["ports"][0]["port"] == 9093
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_amtool_check_config_can_fail(tmp_path):
    "amtool refuses a route to a receiver that does not exist, and a field Alertmanager does not know."
    cfg = yaml.safe_load(ALERTMANAGER.read_text())
    cfg["route"]["receiver"] = "nobody"
    (tmp_path / "a.yml").write_text(yaml.safe_dump(cfg))
    out = _amtool(tmp_path / "a.yml")
    assert out.returncode != 0 and "nobody" in out.stdout + out.stderr
    cfg = yaml.safe_load(ALERTMANAGER.read_text())
    cfg["receivers"][0]["webhook_configs"][0]["urll"] = "https://x.invalid"
    (tmp_path / "b.yml").write_text(yaml.safe_dump(cfg))
    assert _amtool(tmp_path / "b.yml").returncode != 0


# ---- one place for metric names ---------------------------------------------------------------------------------
def test_metric_table_lists_the_agreed_names():
    assert set(metric_table()) == {
        "ray_spam_api_requests_total", "ray_spam_api_request_latency_seconds", "ray_spam_api_batch_size",
        "ray_spam_api_predictions_total", "ray_spam_api_model_info", "spam_model_accuracy", "spam_drift_score",
        "spam_drift_detected", "spam_drift_last_run_timestamp_seconds", "spam_drift_domain_auc",
        "spam_drift_domain_p_value", "spam_drift_domain_alpha"}


def test_raw_metric_names_only_in_the_recording_rules():
    raw = raw_names()
    used = set()
    for r in rules():
        names = series_names(r["expr"])
        if "record" in r: used |= names & raw
        else: assert not names & raw, f"alert {r['alert']} reads raw series {names & raw}: use a recorded one"
    unread = [n for n in metric_table() if not any(u == n or u.startswith(n + "_") for u in used)]
    assert unread == [], f"metrics in the table that no recording rule reads: {unread}"
    consumers = [(t, e) for t, e in panel_queries()] + analysis_queries("x")
    for title, expr in consumers:
        names = series_names(expr)
        assert names and names <= recorded(), f"{title}: {names - recorded()} is not a recorded series"
    # and the raw names appear in no other file of the delivery
    for f in [*DASHBOARDS, ROLLOUT, MON / "prometheus.yml", *(ROOT / "k8s").rglob("*.yaml")]:
        text = f.read_text()
        assert not [n for n in metric_table() if n in text], f"{f} names a raw metric"


def test_dashboard_covers_the_required_panels():
    titles = " | ".join(t for t, _ in panel_queries()).lower()
    for need_ in ("p50 / p95 / p99", "error rate", "throughput", "accuracy trend", "drift scores", "model version"):
        assert need_ in titles, need_
    provisioned = MON / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
    ds = yaml.safe_load(provisioned.read_text())["datasources"][0]
    for f in DASHBOARDS:
        for p in json.loads(f.read_text())["panels"]:
            if p["type"] != "row": assert p["datasource"]["uid"] == ds["uid"]


# ---- a real Prometheus --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exporter():
    "A synthetic exporter of every metric in the table, moving like a live API; yields its port."
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
    reg, port, metrics = CollectorRegistry(), free_port(), {}
    for name, (kind, labels) in metric_table().items():
        if kind == "counter": metrics[name] = Counter(name.removesuffix("_total"), name, labels, registry=reg)
        elif kind == "histogram":
            buckets = (1, 2, 4, 8, 16, 32, 64) if "batch" in name else (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
            metrics[name] = Histogram(name, name, labels, buckets=buckets, registry=reg)
        else: metrics[name] = Gauge(name, name, labels, registry=reg)
    values = {"route": "/api/predict", "status": "200", "label": "spam", "model_version": "3", "version": "3",
              "feature": "text_length", "test": "psi"}

    def child(name, **override):
        "The metric with every label of the table set (defaults above, or `override`)."
        m, (_, labels) = metrics[name], metric_table()[name]
        return m.labels(**{k: override.get(k, values[k]) for k in labels}) if labels else m
    stop = threading.Event()

    def tick():
        i = 0
        while not stop.is_set():
            i += 1
            child("ray_spam_api_requests_total", status="200").inc(20)
            child("ray_spam_api_requests_total", status="500").inc(i % 2)
            for k in range(20): child("ray_spam_api_request_latency_seconds").observe(0.004 * (1 + k % 7))
            child("ray_spam_api_batch_size").observe(8)
            child("ray_spam_api_predictions_total", label="spam").inc(3)
            child("ray_spam_api_predictions_total", label="ham").inc(17)
            child("ray_spam_api_model_info").set(1)
            child("spam_model_accuracy").set(0.98)
            child("spam_drift_score").set(0.07)
            child("spam_drift_detected").set(0)
            child("spam_drift_domain_auc").set(0.51)
            child("spam_drift_domain_p_value").set(0.4)
            child("spam_drift_domain_alpha").set(0.0025)
            child("spam_drift_last_run_timestamp_seconds").set(time.time() - 600)
            stop.wait(0.2)
    server, _ = start_http_server(port, addr="127.0.0.1", registry=reg)
    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    yield port
    alive = thread.is_alive()
    stop.set()
    server.shutdown()
    assert alive, "the synthetic exporter's thread died (see the thread exception above)"


# the platform's series (kube-state-metrics, its custom-resource config, the kubelet) as a healthy system shows them
PLATFORM = [
    ("kube_job_failed", {"namespace": "spam-mlops", "job_name": "mlflow-backup-29140", "condition": "true"}, 0),
    ("kube_job_owner", {"namespace": "spam-mlops", "job_name": "mlflow-backup-29140", "owner_kind": "CronJob",
                        "owner_name": "mlflow-backup", "owner_is_controller": "true"}, 1),
    ("kube_customresource_rayjob_job_status", {"namespace": "spam-mlops", "name": "spam-train-x",
                                               "job_status": "FAILED"}, 0),
    ("kube_customresource_rayjob_deployment_status", {"namespace": "spam-mlops", "name": "spam-train-x",
                                                      "deployment_status": "Failed"}, 0),
    ("kube_customresource_rollout_phase", {"namespace": "spam-mlops", "name": "spam-api", "phase": "Degraded"}, 0),
    ("kube_pod_container_status_last_terminated_reason", {"namespace": "spam-mlops", "pod": "spam-api-x",
                                                          "container": "spam-api", "reason": "OOMKilled"}, 0),
    ("kube_pod_container_status_restarts_total", {"namespace": "spam-mlops", "pod": "spam-api-x",
                                                  "container": "spam-api"}, 0),
    ("kube_pod_container_status_terminated_reason", {"namespace": "spam-mlops", "pod": "drift-x",
                                                     "container": "drift", "reason": "OOMKilled"}, 0),
    ("kubelet_volume_stats_used_bytes", {"namespace": "spam-mlops", "persistentvolumeclaim": "data-minio-0"}, 4e9),
    ("kubelet_volume_stats_capacity_bytes", {"namespace": "spam-mlops", "persistentvolumeclaim": "data-minio-0"}, 1e10),
]


@pytest.fixture(scope="module")
def platform_exporter():
    "The PLATFORM series on an HTTP endpoint (scraped as job kube-state-metrics); yields its port."
    from prometheus_client import CollectorRegistry, Gauge, start_http_server
    reg, port, gauges = CollectorRegistry(), free_port(), {}
    for name, labels, value in PLATFORM:
        if name not in gauges: gauges[name] = Gauge(name, name, list(labels), registry=reg)
        gauges[name].labels(**labels).set(value)
    server, _ = start_http_server(port, addr="127.0.0.1", registry=reg)
    yield port
    server.shutdown()


def platform_alerts() -> set[str]:
    return {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] if g["name"] == "spam-mlops.platform"
            for r in g["rules"]}


@pytest.fixture(scope="module")
def prometheus(exporter, platform_exporter, tmp_path_factory):
    "A real Prometheus scraping the exporter every second and evaluating the rules; yields its base URL."
    need("prometheus")
    cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(RULES)],
           "scrape_configs": [{"job_name": "spam-api", "honor_labels": True, "static_configs": [{
               "targets": [f"127.0.0.1:{exporter}"],
               # what the kubernetes_sd relabelling adds in the cluster
               "labels": {"pod": "spam-api-abc123-x", "rollouts_pod_template_hash": "abc123"}}]},
               {"job_name": "kube-state-metrics", "honor_labels": True,
                "static_configs": [{"targets": [f"127.0.0.1:{platform_exporter}"]}]}]}
    with prometheus_server(tmp_path_factory.mktemp("prometheus"), cfg) as srv:
        first = "recording rules' first data"
        try: wait_until(lambda: prom_query(srv.url, "spam_api:latency_seconds:p95_5m"), 60, first)
        except TimeoutError as e: pytest.fail(f"{e}\n{srv.log_tail(2000)}")
        time.sleep(3)  # a few more evaluations, so every recorded series has samples
        yield srv.url



@pytest.mark.integration
def test_every_panel_query_returns_data(prometheus):
    for title, expr in panel_queries():
        assert prom_query(prometheus, expr), f"{title}: no data for {expr}"


@pytest.mark.integration
def test_every_alert_expression_evaluates(prometheus):
    "Each alert runs without error; with its comparisons made `bool`, each returns a sample (its inputs exist)."
    for r in (r for r in rules() if "alert" in r):
        firing = prom_query(prometheus, r["expr"])
        if r["alert"] == "SpamApiHighErrorRate":  # the exporter fails 2.4 % of requests: under the threshold
            assert firing == []
        if r["alert"] in platform_alerts():  # a healthy platform: nothing failed, volumes 40 % full
            assert firing == [], (r["alert"], firing)
        as_bool = re.sub(r"(>=|<=|==|!=|>|<)\s*(?=[\d(])", r"\1 bool ", r["expr"])
        assert prom_query(prometheus, as_bool), f"{r['alert']}: no data for {as_bool}"


@pytest.mark.integration
def test_canary_analysis_queries_pass_on_healthy_series(prometheus):
    "The AnalysisTemplate's replica queries, with the canary hash filled in, return one value under the thresholds."
    results = {name: prom_query(prometheus, q) for name, q in analysis_queries("abc123")}
    assert set(results) == {"canary-error-rate", "canary-latency-p95"}
    err = float(results["canary-error-rate"][0]["value"][1])
    p95 = float(results["canary-latency-p95"][0]["value"][1])
    assert 0 < err < 0.05 and 0 < p95 < 0.1
    # an unknown revision has no data: an empty vector, which the template's conditions fail (never a pass)
    assert all(prom_query(prometheus, q) == [] for _, q in analysis_queries("no-such-hash"))


# ---- the prometheus-operator component (optional) ---------------------------------------------------------------
OPERATOR = MON / "prometheus-operator"


def test_prometheus_rule_is_generated_from_the_rules():
    "The PrometheusRule is monitoring/alert-rules.yaml as scripts/prometheus_rule.py writes it (not a stale copy)."
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "prometheus_rule.py"), "--check"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    rule = yaml.safe_load((OPERATOR / "prometheus-rule.yaml").read_text())
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_prometheus_operator_component_mirrors_the_scrape_jobs(tmp_path):
    """prod + the component renders; every PodMonitor/ServiceMonitor selects pods or a Service of the render by a
    port they have, and together they cover the scrape jobs of prometheus.yml (but Prometheus itself and the
    kubelets, which kube-prometheus-stack scrapes already)."""
    kubectl = require(vm.find_tool("kubectl"), "kubectl", "run scripts/install-tools.sh")
    rel = lambda p: os.path.relpath(p, tmp_path)  # noqa: E731 (kustomize wants relative paths)
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "spam-mlops",
        "resources": [rel(ROOT / "k8s" / "overlays" / "prod")], "components": [rel(OPERATOR)]}))
    docs = vm.render(tmp_path, kubectl)
    monitors = [d for d in docs if d["kind"] in ("PodMonitor", "ServiceMonitor")]
    assert all(d["metadata"]["namespace"] == "spam-mlops" for d in monitors)
    jobs = {j["job_name"] for j in yaml.safe_load((MON / "prometheus.yml").read_text())["scrape_configs"]}
    # ingress-nginx: its chart's own ServiceMonitor (controller.metrics.serviceMonitor) scrapes the controller
    assert {d["metadata"]["name"] for d in monitors} == jobs - {"prometheus", "kubelet", "ingress-nginx"}
    pods = [x for d in docs for x in _pod_templates(d)]
    services = [(d["metadata"].get("labels", {}), {p["name"] for p in d["spec"]["ports"]})
                for d in docs if d["kind"] == "Service"]
    for m in monitors:
        want = m["spec"]["selector"]["matchLabels"]
        if m["kind"] == "PodMonitor": targets, ports = pods, [e["port"] for e in m["spec"]["podMetricsEndpoints"]]
        else: targets, ports = services, [e["port"] for e in m["spec"]["endpoints"]]
        hits = [names for labels, names in targets if want.items() <= labels.items()]
        assert hits, f"{m['kind']} {m['metadata']['name']} selects nothing"
        assert all(set(ports) <= names for names in hits), (m["metadata"]["name"], ports, hits)
        if m["kind"] == "ServiceMonitor": assert len(hits) == 1, f"{m['metadata']['name']} selects {len(hits)} Services"
    api = next(m for m in monitors if m["metadata"]["name"] == "spam-api")
    assert {r["targetLabel"] for r in api["spec"]["podMetricsEndpoints"][0]["relabelings"]} == \
        {"pod", "rollouts_pod_template_hash"}
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def _pod_templates(d: dict) -> list[tuple[dict, set[str]]]:
    "(labels, container port names) of every pod template of a workload."
    s = d.get("spec") or {}
    if d["kind"] in ("Deployment", "StatefulSet", "Job"): templates = [s["template"]]
    elif d["kind"] == "CronJob": templates = [s["jobTemplate"]["spec"]["template"]]
    elif d["kind"] == "RayJob":
        rc = s["rayClusterSpec"]
        templates = [rc["headGroupSpec"]["template"], *(w["template"] for w in rc.get("workerGroupSpecs", []))]
    else: return []
    return [(t.get("metadata", {}).get("labels", {}),
             {p["name"] for c in t["spec"]["containers"] for p in c.get("ports", []) if "name" in p})
            for t in templates]
