"The canary's AnalysisTemplate as the monitoring tests read it (tests/deploy, tests/integration)."
from __future__ import annotations

import yaml

from .data import ROOT

ROLLOUT = ROOT / "argocd" / "ray-serve-rollout.yaml"
EDGE_PREFIX = "nginx_ingress_controller_"  # the ingress controller's own series (the canary's edge metrics)


def analysis_queries(canary_hash: str) -> list[tuple[str, str]]:
    """(metric name, query with the template's args filled in) of the AnalysisTemplate's replica metrics: those
    on the API's recorded series. The edge metrics read the ingress controller's counter, which is not the API's
    (tests/integration/test_canary_analysis.py runs them on recorded ingress series)."""
    at = next(d for d in yaml.safe_load_all(ROLLOUT.read_text()) if d and d.get("kind") == "AnalysisTemplate")
    return [(m["name"], m["provider"]["prometheus"]["query"].replace("{{args.canary-hash}}", canary_hash))
            for m in at["spec"]["metrics"] if EDGE_PREFIX not in m["provider"]["prometheus"]["query"]]
