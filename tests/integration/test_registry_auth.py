"""The registry needs credentials (issue 17, item 5): a real `mlflow server --app-name basic-auth`, configured from
the rendered manifests (the mlflow Deployment's environment, the ConfigMap mlflow-auth's basic_auth.ini and
bootstrap.py) on its own PostgreSQL database. An anonymous alias move is refused (401), the reader's too (403), the
writer's is allowed, and the reader still loads the champion the way the API does."""
from __future__ import annotations

import runpy
import sys
import uuid

import numpy as np
import pytest
import requests
from support import ROOT, demo_model, group_members, mlflow_server, pg_exec, register_champion, require

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
def manifest():
    "The mlflow container's environment and the ConfigMap mlflow-auth, from the rendered local overlay."
    docs = vm.render("local", require(vm.find_tool("kubectl"), "kubectl", "run scripts/install-tools.sh"))
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
    srv = mlflow_server(tmp_path / "mlflow.log", None, str(tmp_path / "artifacts"), env=env, app="basic-auth")
    try:
        srv.start(timeout=120)
        argv = " ".join(" ".join(p.cmdline()) for p in group_members(srv.pid) if p.is_running())
        assert "basic-auth" in argv and "postgresql" not in argv and admin[1] not in argv, argv  # nothing in argv
        yield srv.url, admin
    finally:
        srv.stop()
        pg_exec(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def test_alias_moves_need_the_writer_and_the_reader_still_serves(auth_server, manifest, monkeypatch, tmp_path, capsys):
    url, admin = auth_server
    writer, reader = ("spam-writer", uuid.uuid4().hex), ("spam-reader", uuid.uuid4().hex)
    (tmp_path / "bootstrap.py").write_text(manifest[1]["bootstrap.py"])
    env = {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": admin[0],
                        "MLFLOW_TRACKING_PASSWORD": admin[1], "SPAM_MLOPS_EXPERIMENT": "tests",
                        "SPAM_MLOPS_MODEL_NAME": NAME, "MLFLOW_WRITER_USERNAME": writer[0],
                        "MLFLOW_WRITER_PASSWORD": writer[1], "MLFLOW_READER_USERNAME": reader[0],
                        "MLFLOW_READER_PASSWORD": reader[1]}
    for k, v in env.items(): monkeypatch.setenv(k, v)
    for _ in range(2):  # idempotent: the second run changes nothing and succeeds
        runpy.run_path(str(tmp_path / "bootstrap.py"), run_name="__main__")
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
    # /metrics: basic-auth fails closed on routes it has no rule for, so only the admin may scrape it (the admin's
    # 200 with --expose-prometheus: tests/deploy/test_manifests.py)
    assert requests.get(url + "/metrics", timeout=10).status_code == 401
    assert requests.get(url + "/metrics", auth=reader, timeout=10).status_code == 403
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
