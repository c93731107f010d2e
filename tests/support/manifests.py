"The hand-made Secrets as k8s/secrets.example.yaml describes them (tests/deploy, tests/integration/test_rayjob.py)."
from __future__ import annotations

import yaml

from .data import ROOT

SECRETS_EXAMPLE = ROOT / "k8s" / "secrets.example.yaml"


def secret_template() -> dict[str, dict[str, str]]:
    "Each Secret the operator creates by hand (k8s/secrets.example.yaml): its keys and placeholder values, by name."
    docs = yaml.safe_load_all(SECRETS_EXAMPLE.read_text())
    return {d["metadata"]["name"]: dict(d.get("stringData") or d.get("data") or {}) for d in docs if d}
