"""The nightly backup goes to a second store (issue 17, item 6), read from the rendered manifests: the CronJob takes
the backup store's endpoint and keys from Secret spam-mlops-backup-dest, its destination passes the same-store check
of `spam-mlops backup` that the lake's own bucket fails, and its NetworkPolicy lets it reach an off-site endpoint."""
from __future__ import annotations

import sys

import pytest
from support import ROOT, require

from spam_mlops.backup import BackupError, check_elsewhere
from spam_mlops.config import BackupSettings, get_settings

sys.path.insert(0, str(ROOT / "scripts"))
import validate_manifests as vm  # noqa: E402


@pytest.fixture(scope="module")
def prod() -> list[dict]:
    return vm.render("prod", require(vm.find_tool("kubectl"), "kubectl", "run scripts/install-tools.sh"))


def _one(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_backup_cronjob_writes_to_a_second_store(prod):
    job = _one(prod, "CronJob", "mlflow-backup")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    c = next(c for c in job["containers"] if c["name"] == "backup")
    assert "spam-mlops-backup-dest" in [r["secretRef"]["name"] for r in c["envFrom"] if "secretRef" in r]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    config = _one(prod, "ConfigMap", next(r["configMapRef"]["name"] for r in c["envFrom"] if "configMapRef" in r))
    lake = get_settings(lake=config["data"]["SPAM_MLOPS_LAKE"], s3_endpoint=config["data"]["AWS_ENDPOINT_URL"])
    protected = [env["SPAM_MLOPS_BACKUP_ARTIFACTS"], lake.lake]
    offsite = BackupSettings(dest_endpoint="https://backups.example")  # what the Secret holds in production
    check_elsewhere(env["SPAM_MLOPS_BACKUP_DEST"], protected, lake, offsite)
    with pytest.raises(BackupError, match="of the store it protects"):  # the lake's own bucket would be refused
        check_elsewhere(f"{lake.lake}/backups", protected, lake, BackupSettings())
    policy = _one(prod, "NetworkPolicy", "backup")["spec"]
    assert any(p.get("port") == 443 for rule in policy["egress"] for p in rule.get("ports", [])
               if any("ipBlock" in t for t in rule.get("to", []))), policy
