"""Hardening of the serve module, against the real components (issue 9, points 2, 4 and 5):

- TLS: `spam-mlops serve --tls-cert --tls-key` answers HTTPS verified against a self-signed certificate, and a
  plain HTTP request to the same port gets no HTTP answer;
- the audit log: one JSON line per request (200, 401, 422), request ids shared with the answer, no key, no text;
- a real `mlflow server` (SQLite backend, local artifacts) that dies and comes back: the API keeps serving and
  switches once it is back; a new API starts from its model cache; with no cache it is up, not ready with the
  reason, and becomes ready by itself when the registry returns.

Every wait is bounded; the server processes are killed on the way out."""
from __future__ import annotations

import datetime as dt
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from support import corpus_path, free_port, mlflow_server, register_champion, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "spam_detection"
KEY = "key-ops-1"
H = {"X-API-Key": KEY}
SPAM = "WINNER!! As a valued network customer you have been selected to receive a £900 prize reward! Call 09061701461"
HAM = "Sorry, I'll call later in the meeting"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("hardening")


@pytest.fixture(scope="module")
def model_file(workdir) -> Path:
    "The probe LSTM fitted on the corpus (3 epochs), saved as a .keras file."
    from spam_mlops.config import get_settings
    from spam_mlops.curate import curate, read_curated
    from spam_mlops.demo import build_demo_model
    from spam_mlops.ingest import ingest
    from spam_mlops.lake import Lake
    settings = get_settings(lake=str(workdir / "lake"), source=str(corpus_path()))
    ingest(settings)
    curate(settings)
    df = read_curated(Lake.from_settings(settings))
    build_demo_model(df.text, (df.label == "spam").astype(int), epochs=3).save(workdir / "model.keras")
    return workdir / "model.keras"


# --- TLS ------------------------------------------------------------------------------------------------------

def _self_signed(folder: Path) -> tuple[Path, Path]:
    "A self-signed certificate for localhost / 127.0.0.1 and its key (PEM files)."
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"


def test_tls_files_checked_at_start(workdir):
    "A missing file, half a pair or a key that is not the certificate's: a clear error before anything starts."
    from spam_mlops.serve import ServeError, check_tls
    cert, key = _self_signed(workdir / "tls-check")
    other_cert, _ = _self_signed(workdir / "tls-other")
    assert check_tls(None, None) is None and check_tls(str(cert), str(key)) == (str(cert), str(key))
    for args, problem in [((str(cert), None), "both"), ((str(cert), str(workdir / "nope.pem")), "not found"),
                          ((str(other_cert), str(key)), "cannot serve")]:
        with pytest.raises(ServeError, match=problem): check_tls(*args)


@pytest.mark.timeout(420)
def test_https_and_plain_http_refused(workdir, model_file):
    "`spam-mlops serve --tls-cert --tls-key`: a verified HTTPS prediction; plain HTTP to the port gets no HTTP answer."
    cert, key = _self_signed(workdir / "tls")
    port, metrics_port = free_port(), free_port()
    env = os.environ | {"SPAM_MLOPS_LAKE": str(workdir / "tls-lake"),
                        "SPAM_MLOPS_SERVE_MODEL_CACHE": str(workdir / "tls-cache"), "SPAM_MLOPS_SERVE_API_KEYS": KEY,
                        "SPAM_MLOPS_SERVE_AUDIT_LOG": str(workdir / "tls-audit.jsonl")}
    log = open(workdir / "tls-server.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "spam-mlops"), "serve", "--host", "127.0.0.1",
                             "--port", str(port),
                             "--metrics-port", str(metrics_port), "--model-uri", str(model_file),
                             "--tls-cert", str(cert), "--tls-key", str(key)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"https://127.0.0.1:{port}"
    try:
        def ready():
            if proc.poll() is not None:
                pytest.fail(f"server exited {proc.returncode}: {(workdir / 'tls-server.log').read_text()[-3000:]}")
            return requests.get(f"{url}/readyz", verify=str(cert), timeout=5).status_code == 200
        wait_until(ready, 300, "HTTPS server ready", every=2)
        r = requests.post(f"{url}/api/predict", json={"text": SPAM}, headers=H, verify=str(cert), timeout=10)
        assert r.status_code == 200 and r.json()["prediction"] == "spam", r.text
        assert r.headers["X-Request-ID"] == r.json()["request_id"]
        with pytest.raises(requests.exceptions.SSLError):  # verification is real: an unknown CA is refused
            requests.get(f"{url}/healthz", timeout=5)
        with pytest.raises(requests.ConnectionError):  # plain HTTP to the HTTPS port: no HTTP answer
            requests.post(f"http://127.0.0.1:{port}/api/predict", json={"text": SPAM}, headers=H, timeout=10)
        wait_until(lambda: f"on https://127.0.0.1:{port}" in (workdir / "tls-server.log").read_text(), 30,
                   "the CLI's https:// line")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try: proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        log.close()


# --- a real MLflow server that dies and comes back -------------------------------------------------------------

def _crash(srv):
    "SIGKILL the MLflow server's process group (a crash, not a shutdown); it no longer answers."
    srv.kill()
    with pytest.raises(requests.ConnectionError): requests.get(f"{srv.url}/health", timeout=2)


def _register(tracking_uri: str, keras_file: Path) -> str:
    "Register `keras_file` under NAME on `tracking_uri` and move the champion alias to it; the version."
    return register_champion(tracking_uri, keras_file, NAME, experiment="hardening")


@pytest.fixture(scope="module")
def registry(workdir, model_file):
    folder = workdir / "registry"  # SQLite and artifacts here: a restart on the same port keeps every version
    srv = mlflow_server(folder / "mlflow-server.log", f"sqlite:///{folder}/mlflow.db", str(folder / "artifacts"))
    srv.start(timeout=120)
    srv.versions = [_register(srv.url, model_file)]
    yield srv
    srv.stop()


def _config(workdir, registry, cache: str, **kw):
    from spam_mlops import serve as sv
    from spam_mlops.config import get_settings
    settings = get_settings(lake=str(workdir / "lake"), mlflow_tracking_uri=registry.url)
    return sv.ServeConfig.from_settings(settings, model_uri=f"models:/{NAME}@champion", api_keys=(f"ops:{KEY}",),
                                        poll_s=1.0, log_flush_s=1.0, model_cache=str(workdir / cache), retry_attempts=2,
                                        breaker_fail_max=2, breaker_reset_s=3.0, **kw)


@pytest.fixture(scope="module")
def api(workdir, registry):
    "A Ray Serve API over the registry's champion: auth, audit file, model cache, fast refresh and breaker."
    from spam_mlops import serve as sv
    port, metrics_port = free_port(), free_port()
    cfg = _config(workdir, registry, "cache-a", audit_log=str(workdir / "audit.jsonl"))
    sv.start_server(sv.deployment(cfg), port=port, host="127.0.0.1", metrics_port=metrics_port, num_cpus=2)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: requests.get(f"{url}/readyz", timeout=2).status_code == 200, 240, "API ready", every=2)
    yield dict(url=url, metrics=f"http://127.0.0.1:{metrics_port}/metrics", audit=workdir / "audit.jsonl", cfg=cfg)
    sv.stop_server()


def _ready_json(url: str) -> dict | None:
    "The /readyz answer when ready, else None."
    r = requests.get(f"{url}/readyz", timeout=5)
    return r.json() if r.status_code == 200 else None


def _predict(url, text=SPAM, headers=H, **kw):
    return requests.post(f"{url}/api/predict", json={"text": text}, headers=headers, timeout=10, **kw)


def _audit(api) -> list[dict]:
    return [json.loads(x) for x in api["audit"].read_text().splitlines()] if api["audit"].exists() else []


@pytest.mark.timeout(300)
def test_audit_log(api, registry):
    "One JSON line per request — 200, 401, 422 — with the request id of the answer, the key's name, no key, no text."
    ok = _predict(api["url"], headers={**H, "X-Request-ID": "client-req-0001"})
    assert ok.status_code == 200 and ok.json()["request_id"] == "client-req-0001" == ok.headers["X-Request-ID"]
    fresh = _predict(api["url"])
    assert fresh.status_code == 200 and fresh.json()["request_id"] == fresh.headers["X-Request-ID"]
    bad_key = _predict(api["url"], headers={"X-API-Key": "wrong-key-99"})
    assert bad_key.status_code == 401
    invalid = requests.post(f"{api['url']}/api/predict", json={"text": "   "}, headers=H, timeout=10)
    assert invalid.status_code == 422
    ids = {"ok": "client-req-0001", "fresh": fresh.json()["request_id"], "bad_key": bad_key.headers["X-Request-ID"],
           "invalid": invalid.headers["X-Request-ID"]}
    def all_audited():
        ls = _audit(api)
        return ls if set(ids.values()) <= {x["request_id"] for x in ls} else None
    lines = wait_until(all_audited, 30, "audit lines written")
    by_id = {x["request_id"]: x for x in lines}
    for line in lines:
        assert set(line) == {"time", "request_id", "method", "route", "status", "latency_ms", "model_version",
                             "key_id"}, line
        assert dt.datetime.fromisoformat(line["time"]).utcoffset() == dt.timedelta(0) and line["latency_ms"] >= 0
    ok_line = by_id[ids["ok"]]
    assert (ok_line["status"], ok_line["key_id"], ok_line["model_version"]) == (200, "ops", registry.versions[0])
    assert by_id[ids["fresh"]]["status"] == 200 and by_id[ids["fresh"]]["route"] == "/api/predict"
    from spam_mlops.predlog import key_fingerprint
    bad_line = by_id[ids["bad_key"]]
    assert bad_line["status"] == 401 and bad_line["key_id"] == key_fingerprint(b"wrong-key-99")
    assert by_id[ids["invalid"]]["status"] == 422 and by_id[ids["invalid"]]["key_id"] == "ops"
    text = api["audit"].read_text()
    assert KEY not in text and "wrong-key-99" not in text and "valued network customer" not in text  # no key, no text

    # the prediction log carries the same request id
    from spam_mlops.config import get_settings
    from spam_mlops.lake import Lake
    lake = Lake.from_settings(get_settings(lake=api["cfg"].lake))

    def logged():
        from spam_mlops.tables import Table
        t = Table(lake, "predictions").read(columns=["request_id"])
        return len(t) > 0 and "client-req-0001" in set(t.request_id)
    wait_until(logged, 30, "prediction log row with the client's request id")


def _scrape(api, name: str) -> float:
    total = 0.0
    for line in requests.get(api["metrics"], timeout=10).text.splitlines():
        if line.startswith(name + "{") and 'dependency="registry"' in line: total += float(line.rsplit(" ", 1)[1])
    return total


def _logs_contain(text: str) -> bool:
    "Whether a log file of this Ray session (replicas' stderr included) contains `text`."
    import ray
    logs = ray._private.worker._global_node.get_logs_dir_path()
    for f in glob.glob(f"{logs}/**/*", recursive=True):
        if f.endswith((".err", ".log", ".out")) and os.path.isfile(f):
            try:
                if text in open(f, errors="replace").read(): return True
            except OSError: pass
    return False


@pytest.mark.timeout(400)
def test_registry_dies_while_serving_then_returns(api, registry, model_file):
    "MLflow killed: same version answers, failures logged and counted; back with a new champion: the API switches."
    v1 = registry.versions[0]
    _crash(registry)
    t_down = time.monotonic()
    answered = []
    while time.monotonic() - t_down < 12:  # a dozen polls of the dead registry, the breaker opening and trying again
        r = _predict(api["url"])
        assert r.status_code == 200 and r.json()["model_version"] == v1, r.text
        answered.append(r.elapsed.total_seconds())
        time.sleep(0.5)
    assert max(answered) < 5  # requests never wait for the registry
    ready = requests.get(f"{api['url']}/readyz", timeout=5).json()
    assert ready["model_version"] == v1 and registry.url.removeprefix("http://") in ready["registry"], ready
    wait_until(lambda: _scrape(api, "ray_spam_api_dependency_failures_total") >= 2, 60, "registry failures counted")
    wait_until(lambda: _scrape(api, "ray_spam_api_circuit_open") >= 1, 60, "registry circuit open in the metrics")
    wait_until(lambda: _logs_contain("model refresh failed, still serving")
               and _logs_contain("circuit breaker registry open"),
               30, "refresh failures and the open circuit in the replica's log")

    registry.start(timeout=120)
    v2 = _register(registry.url, model_file)
    registry.versions.append(v2)
    assert v2 != v1
    wait_until(lambda: _predict(api["url"]).json()["model_version"] == v2, 90, f"API switched to version {v2}")
    ready = requests.get(f"{api['url']}/readyz", timeout=5).json()
    assert ready == {"status": "ready", "model_version": v2, "model_source": "registry", "registry": "ok"}, ready


def _deploy(cfg, name: str):
    "One more application on the running Serve instance, under /<name>."
    from ray import serve

    from spam_mlops import serve as sv
    serve.run(sv.deployment(cfg, name=f"SpamAPI_{name}"), name=name, route_prefix=f"/{name}", blocking=False)


@pytest.mark.timeout(300)
def test_start_from_cache_with_registry_down(api, registry, workdir):
    "A new API while MLflow is down, with the cache the first API filled: ready, from the cache, same version."
    _crash(registry)
    cfg = _config(workdir, registry, "cache-a")  # the first API's cache: it holds the current champion
    _deploy(cfg, "b")
    url = f"{api['url']}/b"
    ready = wait_until(lambda: _ready_json(url),
                       180, "API b ready from its cache", every=2)
    assert ready["model_version"] == registry.versions[-1] and ready["model_source"] == "cache", ready
    assert registry.url.removeprefix("http://") in ready["registry"]
    r = _predict(url)
    assert r.status_code == 200 and r.json()["prediction"] == "spam"
    assert r.json()["model_version"] == registry.versions[-1]


@pytest.mark.timeout(400)
def test_no_cache_not_ready_until_registry_returns(api, registry, workdir):
    "MLflow down, empty cache: up but not ready, the reason names the registry; MLflow back: ready without a restart."
    if registry.running: _crash(registry)
    cfg = _config(workdir, registry, "cache-c-empty")
    _deploy(cfg, "c")
    url = f"{api['url']}/c"

    def not_ready():  # the reason (a Response is falsy when it is not 2xx)
        r = requests.get(f"{url}/readyz", timeout=5)
        return r.json()["error"] if r.status_code == 503 and "model not loaded" in r.text else None
    reason = wait_until(not_ready, 180, "API c up and answering 503", every=2)
    assert f"model registry unreachable at {registry.url}" in reason and "no cached model" in reason, reason
    t = time.monotonic()
    assert requests.get(f"{url}/readyz", timeout=5).status_code == 503 and time.monotonic() - t < 2  # answered at once
    p = _predict(url)
    assert p.status_code == 503 and "registry" in p.json()["error"]
    time.sleep(8)  # retries keep failing; the replica stays up (no restart loop)
    assert requests.get(f"{url}/readyz", timeout=5).status_code == 503
    assert requests.get(f"{url}/healthz", timeout=5).json() == {"status": "ok"}

    registry.start(timeout=120)
    ready = wait_until(lambda: _ready_json(url),
                       90, "API c ready once the registry is back", every=2)
    assert ready["model_version"] == registry.versions[-1] and ready["model_source"] == "registry"
    assert ready["registry"] == "ok"
    assert _predict(url).json()["prediction"] == "spam"
