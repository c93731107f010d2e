"""Security checks that run in CI: no credential in the tree or its git history (detect-secrets with an
audited baseline), and bandit reports no medium or high finding in the package (each exception justified
inline with `# nosec`)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

BIN = Path(sys.executable).parent
BASELINE = ROOT / ".secrets.baseline"


def _baseline_hashes() -> set[str]:
    "Hashes of the findings audited as not secret in the baseline."
    data = json.loads(BASELINE.read_text())
    return {s["hashed_secret"] for found in data["results"].values() for s in found if s.get("is_secret") is False}


def _scan(path: Path) -> list[dict]:
    from detect_secrets import SecretsCollection
    from detect_secrets.settings import default_settings
    found = SecretsCollection()
    with default_settings():
        found.scan_file(str(path))
    return [s.json() for secrets in found.data.values() for s in secrets]


def test_no_secret_in_the_tree(tmp_path):
    files = subprocess.run(["git", "ls-files", "--", ".", f":!{BASELINE.name}"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    baseline = tmp_path / BASELINE.name  # the hook rewrites its baseline: give it a copy
    baseline.write_text(BASELINE.read_text())
    r = subprocess.run([str(BIN / "detect-secrets-hook"), "--baseline", str(baseline), *files], cwd=ROOT,
                       capture_output=True, text=True)
    # exit 1 means a new secret; the hook also exits non-zero when it only refreshed line numbers in its copy
    assert "Potential secrets" not in r.stdout + r.stderr, r.stdout
    assert r.returncode == 0 or "baseline file was updated" in r.stdout + r.stderr, r.stdout + r.stderr


def test_no_secret_in_the_history(tmp_path):
    "Every line ever added in any commit, scanned; only findings audited as false positives may appear."
    log = subprocess.run(["git", "log", "--all", "-p", "--no-color", "--unified=0", "--", ".", f":!{BASELINE.name}"],
                         cwd=ROOT, capture_output=True,
                         check=True).stdout.decode("utf-8", "replace")
    added = tmp_path / "history.txt"
    lines = [line[1:] for line in log.splitlines() if line.startswith("+") and not line.startswith("+++")]
    added.write_text("\n".join(lines))
    unknown = [s for s in _scan(added) if s["hashed_secret"] not in _baseline_hashes()]
    assert not unknown, f"possible credentials in git history: {unknown}"


def test_detector_finds_a_planted_credential(tmp_path):
    "The scan can fail: a real-looking AWS key is found."
    p = tmp_path / "leak.py"
    p.write_text('aws_secret_access_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"\n')  # pragma: allowlist secret
    assert _scan(p)


@pytest.mark.parametrize("target", ["spam_mlops"])
def test_bandit_no_medium_or_high(target):
    r = subprocess.run([str(BIN / "bandit"), "-q", "-r", target, "-ll", "-f", "json"], cwd=ROOT, capture_output=True,
                       text=True)
    issues = json.loads(r.stdout)["results"]
    assert not issues, [(i["filename"], i["line_number"], i["test_id"], i["issue_text"]) for i in issues]
