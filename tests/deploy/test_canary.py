"""The prod canary as rendered: the analysis gates at the edge, cannot pass on no data, and cannot hang.

The decisions themselves (healthy -> promote, 5xx at the edge -> abort, silent -> abort) are tested on a real
Prometheus in tests/integration/test_canary_analysis.py; these tests hold the rendered manifests to the shape that
makes those decisions hold: every metric measured several times with failureLimit >= 1 (one noisy minute is not an
abort, two are), no path to Inconclusive, a minimum-traffic guard on the ingress's counter of the canary Service,
progressDeadlineAbort, and Prometheus able to read the ingress controller at all.
"""
from __future__ import annotations

import re
import sys

import pytest
import yaml
from support import ROOT, require

sys.path.insert(0, str(ROOT / "scripts"))
import validate_manifests as vm  # noqa: E402

EDGE = "nginx_ingress_controller_requests"


@pytest.fixture(scope="module")
def prod() -> list[dict]:
    return vm.render("prod", require(vm.find_tool("kubectl"), "kubectl", "run scripts/install-tools.sh"))


def one(docs: list[dict], kind: str, name: str) -> dict:
    (d,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return d


def template(prod) -> dict:
    return one(prod, "AnalysisTemplate", "spam-api-canary")


def seconds(s: str) -> int:
    m = re.fullmatch(r"(\d+)(s|m|h)", s)
    assert m, s
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]


def test_every_metric_is_measured_several_times_and_tolerates_one_failure(prod):
    for m in template(prod)["spec"]["metrics"]:
        assert m.get("failureLimit", 0) >= 1, f"{m['name']}: failureLimit 0 aborts on one noisy 2-minute rate"
        assert m.get("count", 0) >= m["failureLimit"] + 2, f"{m['name']}: too few measurements to fail or pass"
        assert seconds(m["interval"]) >= 30 and "initialDelay" in m, m["name"]
        assert 1 <= m.get("consecutiveErrorLimit", 4) <= 3, f"{m['name']}: an unreachable Prometheus must end the run"


def test_no_metric_can_be_inconclusive(prod):
    """successCondition only (a measurement that misses it fails) with a len() guard before result[0]; a
    failureCondition beside it would leave NaN and empty results Inconclusive (argo-rollouts#3850)."""
    for m in template(prod)["spec"]["metrics"]:
        assert "failureCondition" not in m and m.get("inconclusiveLimit", 0) == 0, m["name"]
        cond = m["successCondition"]
        assert cond.startswith("len(result) > 0 && ") and "isNaN(result[0])" in cond, (m["name"], cond)


def test_a_minimum_traffic_metric_guards_the_edge(prod):
    at, ro = template(prod), one(prod, "Rollout", "spam-api")
    args = {a["name"]: a.get("value") for a in at["spec"]["args"]}
    canary_svc = ro["spec"]["strategy"]["canary"]["canaryService"]
    assert args["canary-service"] == canary_svc and args["namespace"] == "spam-mlops"
    one(prod, "Service", canary_svc)  # exists in the render
    queries = {m["name"]: (m["provider"]["prometheus"]["query"], m["successCondition"]) for m in at["spec"]["metrics"]}
    guard = [(q, c) for q, c in queries.values() if EDGE in q and "increase(" in q and ">=" in c]
    assert len(guard) == 1, queries
    q, c = guard[0]
    assert 'service="{{args.canary-service}}"' in q and "status" not in q  # every request, whatever its status
    assert c.endswith("result[0] >= {{args.min-requests}}") and int(args["min-requests"]) >= 10
    errors = [q for q, _ in queries.values() if EDGE in q and 'status=~"5.."' in q]
    assert len(errors) == 1 and 'service="{{args.canary-service}}"' in errors[0]
    # beside the replica's latency
    assert any("spam_api:latency_seconds_by_revision" in q for q, _ in queries.values())


def test_rollout_aborts_on_a_stuck_canary_and_waits_for_each_analysis(prod):
    ro = one(prod, "Rollout", "spam-api")
    s = ro["spec"]
    assert s["progressDeadlineAbort"] is True
    steps = s["strategy"]["canary"]["steps"]
    analyses = [st["analysis"] for st in steps if "analysis" in st]
    weights = [st["setWeight"] for st in steps if "setWeight" in st]
    assert len(analyses) == len(weights) - 1 >= 2, steps  # an analysis after every weight but the last (100 %)
    assert not any("pause" in st for st in steps), "a timed pause promotes whatever the analysis says (#3850)"
    for m in template(prod)["spec"]["metrics"]:
        run = seconds(m["initialDelay"]) + (m["count"] - 1) * seconds(m["interval"])
        assert s["progressDeadlineSeconds"] > run, (m["name"], run)
    for a in analyses:
        assert [t["templateName"] for t in a["templates"]] == ["spam-api-canary"]
        assert a["args"] == [{"name": "canary-hash", "valueFrom": {"podTemplateHashValue": "Latest"}}]


def test_prometheus_reads_the_ingress_controller(prod):
    "The edge series exist only if Prometheus scrapes ingress-nginx and its NetworkPolicy lets it."
    cfg = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "ingress-nginx"]
    kept = [r["regex"] for r in job["metric_relabel_configs"] if r["action"] == "keep"]
    assert EDGE in kept and "spam-mlops" in kept
    port = int(job["static_configs"][0]["targets"][0].rsplit(":", 1)[1])
    pol = one(prod, "NetworkPolicy", "prometheus")
    assert any(any(t.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
                   == "ingress-nginx" for t in e["to"]) and {"protocol": "TCP", "port": port} in e["ports"]
               for e in pol["spec"]["egress"])
    assert one(prod, "Ingress", "spam-api")["spec"]["ingressClassName"] == "nginx"
