"""The canary analysis (argocd/ray-serve-rollout.yaml) decides on a real Prometheus, from recorded series.

Three canaries are recorded (OpenMetrics, backfilled with `promtool tsdb create-blocks-from openmetrics` into the
data folder of a real Prometheus before it starts), one after another in time, with the ingress-nginx request
counter of the stable and canary Services (the edge) and the replica's recorded series
(spam_api:*_by_revision:*, monitoring/alert-rules.yaml):

- healthy: the canary gets its share of traffic, no 5xx at the edge, fast replica       -> promote
- edge-5xx: 20 % of the canary's requests end in 502/503 at the ingress (pods refusing or crash-looping); the
  replica itself sees only the requests it answered, all fine                           -> abort
- silent: the canary gets no traffic at all: no edge series, the replica's ratios NaN   -> abort

For every analysis step of the Rollout, each metric's query is taken from the AnalysisTemplate with the args
resolved as Argo does (template values, then the step's args), run against the Prometheus HTTP API at the
measurement times Argo would use (initialDelay, then every interval, `count` times), and its successCondition /
failureCondition evaluated with the subset of expr-lang (github.com/expr-lang/expr) the template uses. Argo's rules
(analysis/analysis.go assessMetricStatus, utils/evaluate EvaluateResult, metricproviders/prometheus) turn the
measurements into a metric phase, the run's worst phase into the step's outcome: Successful -> next step, Failed or
Error -> abort, Inconclusive -> pause (never promote, Rollouts >= 1.8.2).
"""
from __future__ import annotations

import ast
import json
import math
import re
import subprocess
import time
from dataclasses import dataclass, field

import pytest
import requests
import yaml
from support import PROMETHEUS_HINT, ROOT, prometheus_server, require, wait_until

pytestmark = pytest.mark.integration

ROLLOUT_FILE = ROOT / "argocd" / "ray-serve-rollout.yaml"
STEP = 15  # seconds between recorded samples (the scrape interval)


def documents() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(ROLLOUT_FILE.read_text()) if d}


# ---- expr-lang, the subset the template uses ----------------------------------------------------------------
class ExprError(Exception):
    "What expr-lang reports as an evaluation error (Argo: the measurement is an Error)."


_ALLOWED = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.Compare, ast.Lt, ast.LtE, ast.Gt,
            ast.GtE, ast.Eq, ast.NotEq, ast.Call, ast.Name, ast.Load, ast.Subscript, ast.Constant)
_FUNCS = {"len", "isNaN"}


def parse_condition(cond: str) -> ast.Expression:
    """An expr-lang condition as a Python AST, or ValueError when it uses anything beyond the subset:
    `result`, `result[<int>]`, numbers, `len(...)`, `isNaN(...)`, comparisons, `&&`, `||`, and `!` before a call or a
    parenthesis (where expr's `!` and Python's `not` bind the same)."""
    if re.search(r"!(?!=)(?!\s*(isNaN\(|\())", cond): raise ValueError(f"`!` not before a call/parenthesis: {cond}")
    if re.search(r"\b(and|or|not|in|if|else|lambda)\b|[;:\[\]]{2}|__", cond): raise ValueError(f"not expr: {cond}")
    py = re.sub(r"!(?!=)", " not ", cond.replace("&&", " and ").replace("||", " or "))
    tree = ast.parse(py, mode="eval")
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED): raise ValueError(f"{type(node).__name__} is outside the subset: {cond}")
        if isinstance(node, ast.Name) and node.id not in {"result", *_FUNCS}: raise ValueError(f"name {node.id}")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _FUNCS
                                               and len(node.args) == 1 and not node.keywords):
            raise ValueError(f"call outside the subset: {cond}")
        if isinstance(node, ast.Subscript) and not (isinstance(node.value, ast.Name) and node.value.id == "result"
                                                    and isinstance(node.slice, ast.Constant)
                                                    and type(node.slice.value) is int):
            raise ValueError(f"subscript outside the subset: {cond}")
        if isinstance(node, ast.Constant) and type(node.value) not in (int, float): raise ValueError(f"{node.value!r}")
    return tree


def evaluate(tree: ast.AST, result):
    "Interprets the whitelisted AST with Go/expr semantics (short-circuit, NaN compares false, index errors)."
    if isinstance(tree, ast.Expression): return evaluate(tree.body, result)
    if isinstance(tree, ast.Constant): return tree.value
    if isinstance(tree, ast.Name): return result  # only `result` passes the whitelist as a value
    if isinstance(tree, ast.BoolOp):
        for v in tree.values:
            x = evaluate(v, result)
            if type(x) is not bool: raise ExprError(f"{x!r} is not a bool")
            if x is (isinstance(tree.op, ast.Or)): return x
        return isinstance(tree.op, ast.And)
    if isinstance(tree, ast.UnaryOp):
        x = evaluate(tree.operand, result)
        if type(x) is not bool: raise ExprError(f"!{x!r}")
        return not x
    if isinstance(tree, ast.Subscript):
        seq, i = evaluate(tree.value, result), tree.slice.value
        if not isinstance(seq, list): raise ExprError(f"cannot index {type(seq).__name__}")
        if not -len(seq) <= i < len(seq): raise ExprError(f"index out of range: {i} (array of length {len(seq)})")
        return seq[i]
    if isinstance(tree, ast.Call):
        x = evaluate(tree.args[0], result)
        if tree.func.id == "len":
            if not isinstance(x, list): raise ExprError(f"invalid argument for len (type {type(x).__name__})")
            return len(x)
        if not isinstance(x, (int, float)): raise ExprError(f"isNaN of {type(x).__name__}")
        return math.isnan(x)
    if isinstance(tree, ast.Compare):
        left = evaluate(tree.left, result)
        for op, right_node in zip(tree.ops, tree.comparators, strict=True):
            right = evaluate(right_node, result)
            if not all(isinstance(v, (int, float)) and type(v) is not bool for v in (left, right)):
                raise ExprError(f"invalid operation: {left!r} {type(op).__name__} {right!r}")
            ok = {ast.Lt: left < right, ast.LtE: left <= right, ast.Gt: left > right, ast.GtE: left >= right,
                  ast.Eq: left == right, ast.NotEq: left != right}[type(op)]
            if not ok: return False
            left = right
        return True
    raise ExprError(f"unsupported node {type(tree).__name__}")


def evaluate_result(metric: dict, result) -> str:
    "utils/evaluate.EvaluateResult: the phase of one measurement from its conditions."
    success = fail = False
    try:
        if metric.get("successCondition"): success = evaluate(parse_condition(metric["successCondition"]), result)
        if metric.get("failureCondition"): fail = evaluate(parse_condition(metric["failureCondition"]), result)
    except ExprError:
        return "Error"
    if not metric.get("successCondition") and not metric.get("failureCondition"): return "Successful"
    if metric.get("successCondition") and not metric.get("failureCondition"): fail = not success
    if not metric.get("successCondition") and metric.get("failureCondition"): success = not fail
    if fail: return "Failed"
    return "Successful" if success else "Inconclusive"


# ---- Argo's bookkeeping -----------------------------------------------------------------------------------------
def resolve_args(metric: dict, args: dict[str, str]) -> dict:
    "analysis.resolveMetricArgs: {{args.x}} replaced in the metric's JSON (values JSON-quoted); none may remain."
    text = json.dumps(metric)
    for name, value in args.items():
        text = text.replace("{{args." + name + "}}", json.dumps(value)[1:-1])
    assert "{{" not in text, f"unresolved args in {metric['name']}: {re.findall(r'{{[^}]*}}', text)}"
    return json.loads(text)


def duration(s: str) -> int:
    m = re.fullmatch(r"(\d+)(s|m|h)", s)
    assert m, s
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]


def assess_metric(metric: dict, phases: list[str]) -> str:
    "analysis.assessMetricStatus after the given measurements (in order); 'Running' while undecided."
    failed = inconclusive = consecutive_errors = count = 0
    for p in phases:
        if p == "Error": consecutive_errors += 1
        else: consecutive_errors, count = 0, count + 1
        failed += p == "Failed"
        inconclusive += p == "Inconclusive"
    if failed > metric.get("failureLimit", 0): return "Failed"
    if inconclusive > metric.get("inconclusiveLimit", 0): return "Inconclusive"
    if consecutive_errors > metric.get("consecutiveErrorLimit", 4): return "Error"
    if "count" in metric and count >= int(metric["count"]): return "Successful"
    return "Running"


WORSE = ["Successful", "Inconclusive", "Error", "Failed"]  # analysisutil.IsWorse, for completed phases


@dataclass
class Run:
    phase: str
    metrics: dict[str, str] = field(default_factory=dict)
    measurements: dict[str, list[tuple[list[float] | str, str]]] = field(default_factory=dict)


def analysis_run(prom: str, template: dict, step_args: list[dict], start: float) -> Run:
    """One AnalysisRun of the template started at `start`: each metric measured at Argo's times until its phase is
    decided (Argo stops measuring the others once a metric fails: the run is terminating); the run's phase."""
    args = {a["name"]: a["value"] for a in template["spec"]["args"] if "value" in a}
    args |= {a["name"]: a["value"] for a in step_args}
    assert {a["name"] for a in template["spec"]["args"]} <= set(args), "an arg without a value"
    run = Run("Running")
    for m in template["spec"]["metrics"]:
        metric = resolve_args(m, args)
        t, phases, run.measurements[metric["name"]] = start + duration(metric.get("initialDelay", "0s")), [], []
        while (phase := assess_metric(metric, phases)) == "Running":
            result, ph = measure(prom, metric, t)
            phases.append(ph)
            run.measurements[metric["name"]].append((result, ph))
            t += duration(metric["interval"]) if ph != "Error" or "interval" in metric else 10
        run.metrics[metric["name"]] = phase
    run.phase = max(run.metrics.values(), key=WORSE.index)
    return run


def measure(prom: str, metric: dict, t: float) -> tuple[list[float] | str, str]:
    "metricproviders/prometheus: an instant query at time t; a vector becomes []float64, then EvaluateResult."
    q = metric["provider"]["prometheus"]["query"]
    r = requests.get(f"{prom}/api/v1/query", params={"query": q, "time": f"{t:.3f}"}, timeout=10)
    body = r.json()
    if body.get("status") != "success": return body.get("error", "query failed"), "Error"
    data = body["data"]
    assert data["resultType"] == "vector", data["resultType"]  # the provider's other case, scalars, is unused
    result = [float(s["value"][1]) for s in data["result"]]
    return result, evaluate_result(metric, result)


def rollout_outcome(prom: str, docs: dict, start: float, canary_hash: str) -> tuple[str, list[Run]]:
    """Walks the Rollout's canary steps from `start` (setWeight is immediate, each analysis step waits for its run):
    'promote' when every analysis step succeeds, 'abort' on Failed/Error, 'pause' on Inconclusive."""
    canary = docs["Rollout"]["spec"]["strategy"]["canary"]
    assert "analysis" not in canary, "background analysis: this walk models the analysis steps only"
    runs, t = [], start
    for step in canary["steps"]:
        if "analysis" not in step: continue
        (ref,) = step["analysis"]["templates"]
        assert ref["templateName"] == docs["AnalysisTemplate"]["metadata"]["name"]
        for a in step["analysis"].get("args", []):  # the only valueFrom used: the new revision's pod-template-hash
            assert "value" in a or a["valueFrom"] == {"podTemplateHashValue": "Latest"}, a
        step_args = [{"name": a["name"], "value": a.get("value", canary_hash)} for a in step["analysis"]["args"]]
        run = analysis_run(prom, docs["AnalysisTemplate"], step_args, t)
        runs.append(run)
        if run.phase in ("Failed", "Error"): return "abort", runs
        if run.phase == "Inconclusive": return "pause", runs
        t += RUN_SECONDS  # the next analysis step starts after this run (initialDelay + 4 intervals = 6 min)
    return "promote", runs


# ---- the recorded canaries ---------------------------------------------------------------------------------------
RUN_SECONDS = 7 * 60                   # each scenario's analysis steps start this far apart
SCENARIO_SECONDS = 40 * 60             # scenarios are this far apart in time (beyond every lookback)
EDGE = "nginx_ingress_controller_requests"
EDGE_LABELS = {"controller_class": "k8s.io/ingress-nginx", "controller_namespace": "ingress-nginx",
               "controller_pod": "ingress-nginx-controller-7d9f8-x2k4q", "host": "spam-api.example.org",
               "method": "POST", "namespace": "spam-mlops", "path": "/api/predict"}
SCENARIOS = {  # name: (canary hash, canary edge req/s by weight, canary 5xx share at the edge, replica healthy?)
    "healthy": ("6b8d9c7f54", {10: 1.0, 50: 5.0}, 0.0, True),
    "edge-5xx": ("5f7c4b9d86", {10: 1.0, 50: 5.0}, 0.2, True),
    "silent": ("7c9f6d5b43", {10: 0.0, 50: 0.0}, 0.0, False),
}
TOTAL_RPS = 10.0


def labels(d: dict) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(d.items())) + "}"


def recorded_series(t0: int) -> tuple[str, dict[str, int]]:
    "OpenMetrics text of every scenario, and each scenario's start time (its first setWeight: 10)."
    series: dict[str, list[tuple[int, float]]] = {}
    starts = {}
    canary = documents()["AnalysisTemplate"]
    args = {a["name"]: a.get("value") for a in canary["spec"]["args"]}
    for i, (name, (h, rps, bad, replica_ok)) in enumerate(SCENARIOS.items()):
        begin = t0 + i * SCENARIO_SECONDS
        starts[name] = begin + 5 * 60  # 5 minutes of stable-only traffic before the canary starts
        counters: dict[str, float] = {}
        for t in range(begin, begin + SCENARIO_SECONDS - 10 * 60, STEP):
            since = t - starts[name]
            weight = 0 if since < 0 else 10 if since < RUN_SECONDS else 50 if since < 2 * RUN_SECONDS else 100
            c_rps = rps.get(weight, rps[50]) if weight else 0.0
            flows = {("spam-api", "200"): TOTAL_RPS - c_rps, ("spam-api", "404"): 0.02}
            if weight and c_rps:
                flows |= {(args["canary-service"], "200"): c_rps * (1 - bad) - 0.01,
                          (args["canary-service"], "404"): 0.01}
                if bad: flows |= {(args["canary-service"], "502"): c_rps * bad * 0.7,
                                  (args["canary-service"], "503"): c_rps * bad * 0.3}
            for (svc, status), r in flows.items():
                ingress = "spam-api" if svc == "spam-api" else "spam-api-spam-api-canary-canary"
                key = EDGE + labels({**EDGE_LABELS, "service": svc, "status": status, "ingress": ingress})
                counters[key] = counters.get(key, 0.0) + r * STEP
                series.setdefault(key, []).append((t, round(counters[key], 3)))
            if weight:  # the canary's pods exist from the first step on; their own view of the requests
                rev = labels({"rollouts_pod_template_hash": h})
                err = 0.0 if replica_ok else math.nan   # what reached the replica was answered; silent: 0/0
                p95 = 0.031 if replica_ok else math.nan
                series.setdefault("spam_api:error_ratio_by_revision:rate2m" + rev, []).append((t, err))
                series.setdefault("spam_api:latency_seconds_by_revision:p95_2m" + rev, []).append((t, p95))
    out, families = [], {}
    for key, samples in series.items():
        families.setdefault(key.split("{")[0], []).append((key, samples))
    for fam, members in families.items():
        out.append(f"# TYPE {fam} gauge")  # OpenMetrics counters need _total: the ingress's name is kept as-is
        for key, samples in members:
            out += [f"{key} {'NaN' if math.isnan(v) else repr(v)} {t}" for t, v in samples]
    return "\n".join(out) + "\n# EOF\n", starts


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    "A real Prometheus whose TSDB holds the recorded canaries (backfilled before it starts); (url, scenario starts)."
    promtool = require(__import__("shutil").which("promtool"), "promtool", PROMETHEUS_HINT)
    folder = tmp_path_factory.mktemp("prometheus")
    t0 = (int(time.time()) // 3600 - 4) * 3600  # whole hours, 4 h ago: inside retention, outside the head block
    text, starts = recorded_series(t0)
    (folder / "recorded.om").write_text(text)
    (folder / "data").mkdir()
    out = subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", str(folder / "recorded.om"),
                          str(folder / "data")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    with prometheus_server(folder, {"global": {"scrape_interval": "15s"}, "scrape_configs": []}) as srv:
        wait_until(lambda: _count(srv.url, starts["healthy"]) > 0, 30, "the backfilled blocks")
        yield srv.url, starts


def _count(url: str, t: float) -> int:
    r = requests.get(f"{url}/api/v1/query", params={"query": f"count({EDGE})", "time": t}, timeout=5).json()
    return int(float(r["data"]["result"][0]["value"][1])) if r["data"]["result"] else 0


# ---- tests --------------------------------------------------------------------------------------------------------
def test_every_condition_is_in_the_evaluated_subset():
    "Each metric's conditions parse within the subset (so no condition is skipped), and the subset refuses others."
    metrics = documents()["AnalysisTemplate"]["spec"]["metrics"]
    conds = [m[k] for m in metrics for k in ("successCondition", "failureCondition") if k in m]
    assert len(conds) >= len(metrics)
    for m in metrics:
        resolved = resolve_args(m, {a["name"]: a.get("value") or "x" for a in
                                    documents()["AnalysisTemplate"]["spec"]["args"]})
        for k in ("successCondition", "failureCondition"):
            if k in resolved: parse_condition(resolved[k])
    for bad in ("result[0] > 1 && __import__('os')", "result.x > 1", "open('f')", "result[0:1] == 1",
                "!result[0] > 1", "'a' == 'a'", "result[0] > 1 and true"):
        with pytest.raises((ValueError, SyntaxError)): parse_condition(bad)


@pytest.mark.parametrize("result, phase", [([120.0], "Successful"), ([29.0], "Failed"), ([], "Failed"),
                                           ([math.nan], "Failed")])
def test_the_traffic_guard_fails_on_no_data(result, phase):
    "The guard's condition, as Argo evaluates it: too little traffic, an empty vector and NaN all fail."
    (m,) = [m for m in documents()["AnalysisTemplate"]["spec"]["metrics"] if m["name"] == "canary-edge-requests"]
    m = resolve_args(m, {a["name"]: a.get("value") or "x" for a in documents()["AnalysisTemplate"]["spec"]["args"]})
    assert evaluate_result(m, result) == phase
    # without the len() guard, an empty vector is an expr error (Argo: Error, not a pass); with only a failure
    # condition on a threshold, NaN is inconclusive - the failure mode of argo-rollouts#3850 this template avoids
    assert evaluate_result({"successCondition": "result[0] >= 30"}, []) == "Error"
    assert evaluate_result({"successCondition": "result[0] >= 30", "failureCondition": "result[0] < 30"},
                           [math.nan]) == "Inconclusive"


@pytest.mark.parametrize("scenario, expected", [("healthy", "promote"), ("edge-5xx", "abort"), ("silent", "abort")])
def test_recorded_canary_decides(prometheus, scenario, expected):
    url, starts = prometheus
    docs = documents()
    outcome, runs = rollout_outcome(url, docs, starts[scenario], SCENARIOS[scenario][0])
    detail = [(r.phase, r.metrics, r.measurements) for r in runs]
    assert outcome == expected, detail
    first = runs[0]
    if scenario == "healthy":
        assert len(runs) == 2 and all(r.phase == "Successful" for r in runs), detail
        n = min(r[0][0] for r in first.measurements["canary-edge-requests"])
        assert n >= 100, detail  # ~1 request/s at 10 %: the guard passes with a margin, not by accident
    if scenario == "edge-5xx":
        # the replica saw nothing wrong: only the edge metric catches it
        assert first.metrics["canary-edge-error-ratio"] == "Failed", detail
        assert first.metrics["canary-error-rate"] == first.metrics["canary-latency-p95"] == "Successful", detail
        assert first.metrics["canary-edge-requests"] == "Successful", detail
        ratios = [r for r, _ in first.measurements["canary-edge-error-ratio"]]
        assert all(0.15 < r[0] < 0.25 for r in ratios), ratios
    if scenario == "silent":
        assert first.metrics["canary-edge-requests"] == "Failed", detail
        assert first.measurements["canary-edge-requests"][0][0] == [], detail  # no edge series: an empty vector
        assert math.isnan(first.measurements["canary-latency-p95"][0][0][0]), detail
        assert first.metrics["canary-latency-p95"] == "Failed", detail
