"""Integration tests of the serve module on a real Ray Serve (HAProxy ingress), a real MLflow registry (SQLite)
and a real lake folder: HTTP requests, classification, Prometheus metrics, auth, model refresh under load,
the prediction log, and a schemathesis fuzz of the OpenAPI schema."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest
import requests
from support import corpus_path, free_port, register_champion

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY = "test-key-123"
H = {"X-API-Key": KEY}
SPAM = ["WINNER!! As a valued network customer you have been selected to receive a £900 prize reward! "
        "To claim call 09061701461. Claim code KL341. Valid 12 hours only.",
        "FREE entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121 to receive entry",
        "URGENT! You have won a 1 week FREE membership in our £100,000 Prize Jackpot! Txt the word: CLAIM to No: 81010"]
HAM = ["Ok lar... Joking wif u oni...",
       "I'm gonna be home soon and i don't want to talk about this stuff anymore tonight",
       "Sorry, I'll call later in the meeting"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    "A running Ray Serve API over a registered champion; auth on, fast refresh and log flush."
    from spam_mlops import serve as sv
    from spam_mlops.config import get_settings
    from spam_mlops.curate import curate, read_curated
    from spam_mlops.demo import build_demo_model
    from spam_mlops.ingest import ingest
    from spam_mlops.lake import Lake

    tmp = tmp_path_factory.mktemp("serve")
    settings = get_settings(lake=str(tmp / "lake"), source=str(corpus_path()),
                            mlflow_tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    ingest(settings)
    curate(settings)
    df = read_curated(Lake.from_settings(settings))
    model = build_demo_model(df.text, (df.label == "spam").astype(int), epochs=3)
    model.save(tmp / "model.keras")

    version = register_champion(settings.mlflow_tracking_uri, tmp / "model.keras", experiment="serve-test",
                                artifacts=tmp / "artifacts")

    port, metrics_port = free_port(), free_port()
    cfg = sv.ServeConfig.from_settings(settings, model_uri="models:/spam_detection@champion", api_keys=(KEY,),
                                       poll_s=1.0, log_flush_s=1.0)
    sv.start_server(sv.deployment(cfg), port=port, host="127.0.0.1", metrics_port=metrics_port, num_cpus=2)
    url = f"http://127.0.0.1:{port}"
    for _ in range(180):
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200: break
        except requests.RequestException: pass
        time.sleep(1)
    else: pytest.fail("server not ready in 180 s")
    srv = dict(url=url, metrics=f"http://127.0.0.1:{metrics_port}/metrics", settings=settings, tmp=tmp, version=version,
               stopped=False)
    yield srv
    if not srv["stopped"]: sv.stop_server()


def _predict(url, text, headers=H, **kw):
    return requests.post(f"{url}/api/predict", json={"text": text}, headers=headers, timeout=10, **kw)


def test_health_ready_docs(server):
    assert requests.get(f"{server['url']}/healthz").json() == {"status": "ok"}
    r = requests.get(f"{server['url']}/readyz").json()
    assert r["status"] == "ready" and r["model_version"] == server["version"]
    assert requests.get(f"{server['url']}/docs").status_code == 200
    assert {"/api/predict/batch", "/api/feedback"} <= set(requests.get(f"{server['url']}/openapi.json").json()["paths"])


def test_known_spam_and_ham(server):
    for text in SPAM:
        r = _predict(server["url"], text)
        assert r.status_code == 200 and r.json()["prediction"] == "spam", (text, r.text)
        assert r.json()["spam_probability"] > 0.5 and r.json()["model_version"] == server["version"]
    for text in HAM:
        r = _predict(server["url"], text)
        assert r.status_code == 200 and r.json()["prediction"] == "ham", (text, r.text)
    r = requests.post(f"{server['url']}/api/predict/batch", json={"texts": SPAM + HAM}, headers=H, timeout=10)
    assert [p["prediction"] for p in r.json()["predictions"]] == ["spam"] * 3 + ["ham"] * 3
    ids = [(p["request_id"], p["prediction_id"]) for p in r.json()["predictions"]]
    assert len({i[0] for i in ids}) == 1 and len({i[1] for i in ids}) == 6  # one call, one answer id per text


def test_roadmap_curl(server):
    "The roadmap's call, as written (with the key this server requires)."
    r = requests.post(f"{server['url']}/api/predict", data='{"text": "Click here for FREE money!"}',
                      headers={"Content-Type": "application/json", **H}, timeout=10)
    assert r.status_code == 200 and set(r.json()) >= {"prediction", "spam_probability", "model_version"}


def test_auth(server):
    assert _predict(server["url"], "hello", headers={}).status_code == 401
    r = _predict(server["url"], "hello", headers={"X-API-Key": "wrong"})
    assert r.status_code == 401 and "X-API-Key" in r.json()["error"]
    assert requests.get(f"{server['url']}/healthz").status_code == 200  # probes stay open


@pytest.mark.parametrize("body,problem", [
    (b"not json", "JSON"), (b'{"txt": "x"}', "text: field required"), (b'{"text": 5}', "text"),
    (b'{"text": "   "}', "whitespace"), (b'{"text": "\xff"}', "UTF-8"), (b'{"text": "\\udc00"}', "unicode"),
])
def test_bad_input_is_4xx_naming_the_problem(server, body, problem):
    r = requests.post(f"{server['url']}/api/predict", data=body, headers={"Content-Type": "application/json", **H},
                      timeout=10)
    assert 400 <= r.status_code < 500 and problem.lower() in r.json()["error"].lower(), r.text
    r = requests.post(f"{server['url']}/api/predict/batch", json={"texts": ["x"] * 1001}, headers=H, timeout=10)
    assert r.status_code == 422 and "texts" in r.json()["error"]


def _scrape(server, name: str) -> dict[str, float]:
    "Series of metric `name` (summed over replicas) from Ray's metrics endpoint, keyed by their label text."
    out: dict[str, float] = {}
    for line in requests.get(server["metrics"], timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, value = line.rsplit(" ", 1)
            out[labels] = out.get(labels, 0.0) + float(value)
    return out


def _total(series: dict[str, float], **labels) -> float:
    return sum(v for k, v in series.items() if all(f'{n}="{x}"' in k for n, x in labels.items()))


def _wait_metric(server, name, pred, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        s = _scrape(server, name)
        if pred(s): return s
        time.sleep(2)
    raise AssertionError(f"{name} did not reach the expected value in {timeout} s: {s}")


def test_prometheus_counters_move(server):
    before = _total(_scrape(server, "ray_spam_api_requests_total"), route="/api/predict", status="200")
    before_spam = _total(_scrape(server, "ray_spam_api_predictions_total"), label="spam")
    for text in SPAM: assert _predict(server["url"], text).status_code == 200
    _predict(server["url"], "x", headers={})
    _wait_metric(server, "ray_spam_api_requests_total",
                 lambda s: _total(s, route="/api/predict", status="200") >= before + 3
                 and _total(s, route="/api/predict", status="401") >= 1)
    _wait_metric(server, "ray_spam_api_predictions_total", lambda s: _total(s, label="spam") >= before_spam + 3)
    _wait_metric(server, "ray_spam_api_model_info", lambda s: _total(s, version=server["version"]) >= 1)
    assert _wait_metric(server, "ray_spam_api_request_latency_seconds_count",
                        lambda s: _total(s, route="/api/predict") > 0)
    assert _wait_metric(server, "ray_spam_api_batch_size_count", lambda s: sum(s.values()) > 0)


def test_new_champion_picked_up_under_load(server):
    "Requests flow from 4 threads while a new version is registered; all succeed and the version switches."
    stop, results, errors = threading.Event(), [], []

    def client():
        with requests.Session() as s:
            while not stop.is_set():
                try:
                    r = s.post(f"{server['url']}/api/predict", json={"text": SPAM[0]}, headers=H, timeout=10)
                    answer = r.json().get("model_version") if r.ok else r.text
                    (results if r.status_code == 200 else errors).append(answer)
                except requests.RequestException as e: errors.append(repr(e))

    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(client) for _ in range(4)]
        time.sleep(2)
        new = register_champion(server["settings"].mlflow_tracking_uri, server["tmp"] / "model.keras",
                                experiment="serve-test")
        assert new != server["version"]
        end = time.time() + 90
        while time.time() < end and (not results or results[-1] != new): time.sleep(0.5)
        time.sleep(2)
        stop.set()
        for f in futs: f.result()
    assert not errors, errors[:5]
    assert results[0] == server["version"] and results[-1] == new and len(results) > 50
    assert requests.get(f"{server['url']}/readyz").json()["model_version"] == new
    _wait_metric(server, "ray_spam_api_model_info",
                 lambda s: _total(s, version=new) >= 1 and _total(s, version=server["version"]) == 0)
    server["version"] = new


def _logged(server) -> pd.DataFrame:
    "The prediction log: the lake's `predictions` table."
    from spam_mlops.lake import Lake
    from spam_mlops.tables import Table
    return Table(Lake.from_settings(server["settings"]), "predictions").read()


def test_prediction_log_lands_in_lake(server):
    from spam_mlops.features import FEATURE_TYPES
    from spam_mlops.ingest import message_id
    marker = f"Call 09061701461 to claim your prize {time.time()}"
    answer = _predict(server["url"], marker)
    assert answer.status_code == 200
    end = time.time() + 30
    while time.time() < end:
        df = _logged(server)
        if len(df) and (df.text == marker).any(): break
        time.sleep(1)
    row = df[df.text == marker].iloc[0]
    assert row.message_id == message_id(marker) and row.has_phone and row.model_version == server["version"]
    assert set(FEATURE_TYPES) <= set(df.columns) and str(df.timestamp.dtype) == "datetime64[us, UTC]"
    assert row.prediction in ("spam", "ham") and 0 <= row.spam_probability <= 1 and len(row.text_sha256) == 64
    from spam_mlops.predlog import key_fingerprint
    assert row.prediction_id == answer.json()["prediction_id"] and row["dt"] == f"{row.timestamp:%Y-%m-%d}"
    assert row.api_key_id == key_fingerprint(KEY.encode())  # a key without a name: its fingerprint


def test_schemathesis_fuzz_no_server_error(server):
    "Fuzz every operation of the OpenAPI schema, valid and invalid data: never a 5xx, documented codes and bodies."
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation.modes import GenerationMode
    c = schemathesis.checks
    checks = [c.not_a_server_error, c.status_code_conformance, c.content_type_conformance,
              c.response_schema_conformance]
    schema = schemathesis.openapi.from_url(f"{server['url']}/openapi.json")
    failures, calls = [], []
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=op.as_strategy(mode))
            @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def fuzz(case):
                calls.append(case.call_and_validate(headers=H, checks=checks).status_code)
            try: fuzz()
            except Unsatisfiable:  # a GET without parameters has nothing to break
                if not (mode == GenerationMode.NEGATIVE and op.method.upper() == "GET"): raise
            except Exception as e: failures.append(f"{op.method.upper()} {op.path} ({mode}): {str(e)[:2000]}")
    assert not failures, "\n".join(failures)
    assert len(calls) > 100 and not any(code >= 500 for code in calls)


def test_zz_shutdown_flushes_log(server):
    "A graceful shutdown writes what the log still holds: every answered request is in the lake."
    from spam_mlops import serve as sv
    texts = [f"last words {i} {time.time()}" for i in range(20)]
    r = requests.post(f"{server['url']}/api/predict/batch", json={"texts": texts}, headers=H, timeout=10)
    assert r.status_code == 200
    sv.stop_server()
    server["stopped"] = True
    assert set(texts) <= set(_logged(server).text)
