"""The registry needs credentials (issue 17, item 5): a real `mlflow server --app-name basic-auth`, configured from
the rendered manifests (the mlflow Deployment's environment, the ConfigMap mlflow-auth's basic_auth.ini and
bootstrap.py) on its own PostgreSQL database. An anonymous alias move is refused (401), the reader's too (403), the
writer's is allowed, and the reader still loads the champion the way the API does."""
from __future__ import annotations

import re
import runpy
import sys
import uuid

import numpy as np
import pytest
import requests
import yaml
from support import (
    ROOT,
    demo_model,
    group_members,
    mlflow_server,
    pg_exec,
    prom_query,
    prometheus_server,
    register_champion,
    require,
    wait_until,
)

from spam_mlops import registry
from spam_mlops.model import predict_texts
from spam_mlops.registry import RegistryError

sys.path.insert(0, str(ROOT / "scripts"))
import validate_manifests as vm  # noqa: E402

pytestmark = pytest.mark.integration
NAME = "spam_detection"
TEXTS = ["WINNER!! claim your free prize now, call xphone", "ok see you at home later"]
ALIAS = "/api/2.0/mlflow/registered-models/alias"


def _as(monkeypatch, account: tuple[str, str] | None):
    "Talk to MLflow as `account` (MLflow's client reads these variables), or anonymously."
    for k, v in zip(("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"), account or (None, None), strict=True):
        if v is None: monkeypatch.delenv(k, raising=False)
        else: monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def docs():
    "The rendered local overlay."
    return vm.render("local", require(vm.find_tool("kubectl"), "kubectl", "run scripts/install-tools.sh"))


@pytest.fixture(scope="module")
def manifest(docs):
    "The mlflow container's environment and the ConfigMap mlflow-auth, from the rendered local overlay."
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mlflow-auth")
    return dep["spec"]["template"]["spec"]["containers"][0], cm["data"]


@pytest.fixture
def auth_server(manifest, tmp_path):
    """The auth variant of the MLflow server fixture: the container's env with the Secrets filled in by test values
    and the cluster's addresses made this machine's; yields (url, admin account)."""
    container, data = manifest
    db, admin = f"spam_auth_{uuid.uuid4().hex[:10]}", ("admin", uuid.uuid4().hex)
    local = f"//127.0.0.1:5432/{db}"
    secrets = {"PGUSER": "postgres", "PGPASSWORD": "unused-with-trust-auth", "MLFLOW_AUTH_ADMIN_USERNAME": admin[0],
               "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1], "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex}
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env |= {e["name"]: secrets[e["name"]] for e in container["env"] if "valueFrom" in e and e["name"] in secrets}
    assert set(secrets) <= set(env), env.keys()
    (tmp_path / "basic_auth.ini").write_text(data["basic_auth.ini"].replace("//postgres:5432/mlflow", local))
    env |= {"MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
            "MLFLOW_BACKEND_STORE_URI": env["MLFLOW_BACKEND_STORE_URI"].replace("//postgres:5432/mlflow", local)}
    env.pop("MLFLOW_ALLOWED_HOSTS")  # the in-cluster names: here the server is reached as 127.0.0.1
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"): env[k] = ""  # nothing inherited
    pg_exec(f"CREATE DATABASE {db}")
    (expose,) = [a for a in container["args"] if a.startswith("--expose-prometheus=")]  # the pod's /metrics
    srv = mlflow_server(tmp_path / "mlflow.log", None, str(tmp_path / "artifacts"), env=env, app="basic-auth",
                        args=(f"--expose-prometheus={tmp_path / 'prometheus-multiproc'}",))
    assert expose.endswith("/tmp/prometheus-multiproc"), expose
    try:
        srv.start(timeout=120)
        argv = " ".join(" ".join(p.cmdline()) for p in group_members(srv.pid) if p.is_running())
        assert "basic-auth" in argv and "postgresql" not in argv and admin[1] not in argv, argv  # nothing in argv
        yield srv.url, admin
    finally:
        srv.stop()
        pg_exec(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def _bootstrap(url: str, admin: tuple[str, str], script: str, monkeypatch, tmp_path,
               metrics_user: str = "prometheus") -> dict[str, tuple[str, str]]:
    """Run the ConfigMap's bootstrap.py twice (idempotent: the second run changes nothing and succeeds) as the Job
    does, as the admin; returns the accounts it made, by role (writer, reader, metrics)."""
    accounts = {"writer": ("spam-writer", uuid.uuid4().hex), "reader": ("spam-reader", uuid.uuid4().hex),
                "metrics": (metrics_user, uuid.uuid4().hex)}
    (tmp_path / "bootstrap.py").write_text(script)
    env = {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": admin[0], "MLFLOW_TRACKING_PASSWORD": admin[1],
           "SPAM_MLOPS_EXPERIMENT": "tests", "SPAM_MLOPS_MODEL_NAME": NAME}
    for role, (user, password) in accounts.items():
        env |= {f"MLFLOW_{role.upper()}_USERNAME": user, f"MLFLOW_{role.upper()}_PASSWORD": password}
    for k, v in env.items(): monkeypatch.setenv(k, v)
    for _ in range(2): runpy.run_path(str(tmp_path / "bootstrap.py"), run_name="__main__")
    _as(monkeypatch, None)
    return accounts


def test_alias_moves_need_the_writer_and_the_reader_still_serves(auth_server, manifest, monkeypatch, tmp_path, capsys):
    url, admin = auth_server
    accounts = _bootstrap(url, admin, manifest[1]["bootstrap.py"], monkeypatch, tmp_path)
    writer, reader = accounts["writer"], accounts["reader"]
    out = capsys.readouterr()
    assert f"{reader[0]}: READ on registered_model {NAME}" in out.out, out.out

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    _as(monkeypatch, writer)  # training registers and promotes as the writer
    model = demo_model(TEXTS * 4, [1, 0] * 4, epochs=1)
    v1 = register_champion(url, model, NAME, experiment="tests")
    client = registry.client(url)
    mv1 = client.get_model_version(NAME, v1)
    with registry.using(url):  # a second version of the same files: the model is not logged again
        import mlflow
        v2 = str(mlflow.register_model(mv1.source, NAME).version)
    client.set_registered_model_alias(NAME, registry.CHAMPION, v2)
    body = {"name": NAME, "alias": registry.CHAMPION, "version": v1}
    assert requests.post(url + ALIAS, json=body, timeout=10).status_code == 401  # anonymous
    assert requests.post(url + ALIAS, json=body, auth=reader, timeout=10).status_code == 403
    assert requests.get(url + "/api/2.0/mlflow/registered-models/get", params={"name": NAME}, auth=reader,
                        timeout=10).ok  # ... though it may read the model
    _as(monkeypatch, reader)
    # `spam-mlops lake vacuum` (lake-maintenance CronJob, reader account) lists the versions to keep their data
    assert {mv.version for mv in registry.client(url).search_model_versions(f"name = '{NAME}'")} == {v1, v2}
    with pytest.raises(RegistryError, match="cannot move"):
        registry.set_champion(registry.client(url), NAME, v1, "reader tries")
    _as(monkeypatch, None)
    with pytest.raises(RegistryError, match="cannot move|401|authenticated"):
        registry.set_champion(registry.client(url), NAME, v1, "anonymous tries")
    _as(monkeypatch, writer)
    assert registry.alias_version(registry.client(url), NAME).version == v2  # nothing moved
    registry.set_champion(registry.client(url), NAME, v1, "the writer rolls back")

    # the API runs as the reader: the service follows the alias, downloads the model and answers
    from prometheus_client import CollectorRegistry

    from spam_mlops.service import Metrics, ServeConfig, Service
    _as(monkeypatch, reader)
    svc = Service(ServeConfig(model_uri=f"models:/{NAME}@champion", tracking_uri=url, lake=None, poll_s=0,
                              max_batch_size=2),
                  Metrics("prometheus", CollectorRegistry())).load()
    assert svc.version == v1
    answers = svc.predict(TEXTS)
    assert [a["model_version"] for a in answers] == [v1, v1]
    np.testing.assert_allclose([a["spam_probability"] for a in answers], predict_texts(model, TEXTS), atol=1e-5)


def test_prometheus_scrapes_mlflow_as_an_account_without_grants(auth_server, manifest, docs, monkeypatch, tmp_path):
    """Prometheus' mlflow job (rendered prometheus.yml) logs in as `prometheus`, which may read /metrics and nothing
    else; anonymous scrapes get 401. A real Prometheus with the rendered job scrapes the real server: up is 1, and a
    copy of the job with a wrong password is down (the login is what makes it work)."""
    url, admin = auth_server
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("prometheus-config"))
    (job,) = [j for j in yaml.safe_load(cm["data"]["prometheus.yml"])["scrape_configs"] if j["job_name"] == "mlflow"]
    user = job["basic_auth"]["username"]
    metrics = _bootstrap(url, admin, manifest[1]["bootstrap.py"], monkeypatch, tmp_path, metrics_user=user)["metrics"]
    page = requests.get(url + "/metrics", auth=metrics, timeout=10)
    assert page.status_code == 200 and re.search(r"^mlflow_\w+", page.text, re.M), page.text[:300]
    assert requests.get(url + "/metrics", timeout=10).status_code == 401  # anonymous
    # ... and it reads nothing else: no model, no experiment, no alias move (every API route keeps its validator)
    get = {"/api/2.0/mlflow/registered-models/get": {"name": NAME},
           "/api/2.0/mlflow/experiments/get-by-name": {"experiment_name": "tests"}}
    for path, params in get.items():
        assert requests.get(url + path, params=params, auth=metrics, timeout=10).status_code == 403, path
    body = {"name": NAME, "alias": registry.CHAMPION, "version": "1"}
    assert requests.post(url + ALIAS, json=body, auth=metrics, timeout=10).status_code == 403

    # the rendered job, on this machine: the pod's address becomes the server's, the Secret's file a test file
    assert job["basic_auth"]["password_file"].startswith("/etc/prometheus/secrets/mlflow-metrics/")
    (tmp_path / "password").write_text(metrics[1])
    (tmp_path / "wrong").write_text("not-the-password")
    target = {"static_configs": [{"targets": [url.removeprefix("http://")]}]}
    local = {k: v for k, v in job.items() if k not in ("kubernetes_sd_configs", "relabel_configs")} | target
    local["basic_auth"] = local["basic_auth"] | {"password_file": str(tmp_path / "password")}
    wrong = local | {"job_name": "mlflow-wrong-password", "basic_auth": local["basic_auth"] | {
        "password_file": str(tmp_path / "wrong")}}
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"}, "scrape_configs": [local, wrong]}
    with prometheus_server(tmp_path / "prometheus", config) as prom:
        ups = wait_until(lambda: (r := {s["metric"]["job"]: s["value"][1] for s in prom_query(prom.url, "up")})
                         and len(r) == 2 and r, 60, "both targets scraped")
        assert ups == {"mlflow": "1", "mlflow-wrong-password": "0"}, ups
        assert wait_until(lambda: prom_query(prom.url, 'count({job="mlflow", __name__=~"mlflow_.+"})'), 30,
                          "MLflow's series in Prometheus")
