"""No credential on a command line: no rendered manifest puts a password, a Secret's value or a URI with a password
into a container's `command`/`args` (or a RayJob's entrypoint), where `ps`, the process table of the node and
`kubectl describe` show it. Secrets reach programs through the environment or files (issue 17, item 5)."""
from __future__ import annotations

import re
import sys

import pytest
from support import ROOT, require

sys.path.insert(0, str(ROOT / "scripts"))
import validate_manifests as vm  # noqa: E402

OVERLAYS = ["local", "prod"]
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|PASSWD|API_KEYS?$|_KEY$")
URI_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    kubectl = require(vm.find_tool("kubectl"), "kubectl", "run scripts/install-tools.sh")
    return {o: vm.render(o, kubectl) for o in OVERLAYS}


def containers(x, where: str = ""):
    "(where, container) for every container and init container anywhere in a rendered object."
    if isinstance(x, dict):
        for k in ("containers", "initContainers"):
            for c in x.get(k) or []:
                if isinstance(c, dict) and "image" in c: yield f"{where}/{c.get('name')}", c
        for k, v in x.items(): yield from containers(v, f"{where}/{k}" if k in ("spec", "template") else where)
    elif isinstance(x, list):
        for v in x: yield from containers(v, where)


def leaks(words: list[str], env: list[dict]) -> list[str]:
    "The command-line words that carry a credential: a Secret-fed or secret-named $(VAR), or a URI with a password."
    from_secret = {e["name"] for e in env if "secretKeyRef" in (e.get("valueFrom") or {})}
    out = []
    for w in words:
        for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", w):
            if var in from_secret or SECRETISH.search(var): out.append(f"$({var}) in {w!r}")
        if URI_WITH_PASSWORD.search(w): out.append(f"URI with a password: {w!r}")
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_credential_on_a_command_line(rendered, overlay):
    found = []
    for d in rendered[overlay]:
        name = f"{d['kind']}/{d['metadata']['name']}"
        for where, c in containers(d.get("spec") or {}):
            found += [f"{name}{where}: {x}" for x in leaks([*c.get("command", []), *c.get("args", [])],
                                                           c.get("env") or [])]
        if d["kind"] == "RayJob":
            found += [f"{name} entrypoint: {x}" for x in leaks([d["spec"].get("entrypoint", "")], [])]
    assert not found, "\n".join(found)


def test_the_check_catches_each_kind_of_leak():
    env = [{"name": "DB_PASS", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
           {"name": "HOST", "value": "h"}]
    assert leaks(["--uri=postgresql://u:$(DB_PASS)@h/db"], env)  # a Secret-fed variable
    assert leaks(["--token=$(API_TOKEN)"], [])  # a variable named like a secret
    assert leaks(["--backend-store-uri=postgresql+psycopg2://mlflow:hunter2@postgres:5432/mlflow"], [])
    assert not leaks(["--host=$(HOST)", "--backend-store-uri=postgresql+psycopg2://postgres:5432/mlflow",
                      "-U", "$(PGUSER)"], env)


def test_mlflow_runs_basic_auth_with_its_store_uri_outside_argv(rendered):
    "The registry needs credentials in every overlay, and the tracking database's URI names no user or password."
    for overlay in OVERLAYS:
        dep = next(d for d in rendered[overlay] if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
        c = dep["spec"]["template"]["spec"]["containers"][0]
        assert "--app-name=basic-auth" in c["args"], c["args"]
        assert not any(a.startswith("--backend-store-uri") for a in c["args"]), c["args"]
        env = {e["name"]: e for e in c["env"]}
        assert "@" not in env["MLFLOW_BACKEND_STORE_URI"]["value"]
        assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "postgres-credentials"
        assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-admin"
        users = {}
        for d in rendered[overlay]:
            for _, cont in containers(d.get("spec") or {}):
                for ref in cont.get("envFrom") or []:
                    if ref.get("secretRef", {}).get("name", "").startswith("mlflow-"):
                        users.setdefault(ref["secretRef"]["name"], set()).add(d["metadata"]["name"])
        assert users["mlflow-reader"] == {"spam-api", "lake-maintenance"}, users  # readers: the API, lake vacuum
        assert {"spam-train", "spam-tune", "drift-detection"} <= users["mlflow-writer"], users
        assert "spam-api" not in users["mlflow-writer"] and users["mlflow-admin"] == {"mlflow-auth-bootstrap"}, users


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_logs_in_to_mlflow_as_the_metrics_account(rendered, overlay):
    """basic-auth puts MLflow's /metrics behind a login: Prometheus' mlflow job logs in as the account of Secret
    mlflow-metrics (its password a file from that Secret, mounted in the Prometheus pod), which the bootstrap Job
    creates with no grant; the server lets a login without a grant read /metrics (MLFLOW_BASIC_AUTH_FAIL_CLOSED off).
    The scrape itself is run against a real server in tests/integration/test_registry_auth.py."""
    import yaml
    from support.manifests import secret_template
    docs = rendered[overlay]

    def by(kind: str, name: str) -> dict:
        return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name))
    config = yaml.safe_load(by("ConfigMap", "prometheus-config")["data"]["prometheus.yml"])
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "mlflow"]
    assert job["basic_auth"]["username"] == secret_template()["mlflow-metrics"]["MLFLOW_TRACKING_USERNAME"]
    pod = by("Deployment", "prometheus")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    files = {f"{mounts[v['name']]}/{i['path']}": (v["secret"]["secretName"], i["key"])
             for v in pod["volumes"] if "secret" in v for i in v["secret"].get("items") or []}
    assert files.get(job["basic_auth"]["password_file"]) == ("mlflow-metrics", "MLFLOW_TRACKING_PASSWORD"), files
    boot = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in by("Job", "mlflow-auth-bootstrap")["spec"]["template"]
            ["spec"]["containers"][0]["env"] if "valueFrom" in e}
    assert boot["MLFLOW_METRICS_USERNAME"] == {"name": "mlflow-metrics", "key": "MLFLOW_TRACKING_USERNAME"}
    assert boot["MLFLOW_METRICS_PASSWORD"] == {"name": "mlflow-metrics", "key": "MLFLOW_TRACKING_PASSWORD"}
    mlflow = {e["name"]: e.get("value") for e in by("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
              ["env"]}
    assert mlflow["MLFLOW_BASIC_AUTH_FAIL_CLOSED"] == "false"
