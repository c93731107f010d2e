"""The feedback API against a real Ray Serve (HAProxy ingress) and a real lake folder (issue 16, part 3): every
answer's own prediction id; `POST /api/feedback` one label or a list, the table its flush writes, the join with the
prediction log (unknown ids quarantined, conflicts counted, the latest label wins); bad input (a label other than
ham/spam, malformed JSON, no key, a list too long, a body over the cap); a flood (429, Retry-After and the
metric); the bulk import `spam-mlops feedback FILE`; production failing closed (no keys, no start)."""
from __future__ import annotations

import os
import subprocess

import pytest
import requests
import yaml
from serve_helpers import total, wait_metric, wait_ready
from support import BIN, ROOT, demo_model, free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY = "fb-key-1"
H = {"X-API-Key": KEY}
CAP = 100_000  # the body cap of this server (SPAM_MLOPS_SERVE_MAX_BODY_BYTES)
BURST = 1_200  # the feedback bucket of this server: labels at once, per key


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    "A running Ray Serve API over a small demo model file; one key (`ops`), fast flushes, a small bucket and cap."
    from spam_mlops import serve as sv
    from spam_mlops.config import get_settings
    from spam_mlops.lake import Lake
    tmp = tmp_path_factory.mktemp("feedback")
    demo_model(["WIN a FREE prize now call 09061701461", "see you at 5 then"] * 8, [1, 0] * 8).save(tmp / "m.keras")
    settings = get_settings(lake=str(tmp / "lake"))
    cfg = sv.ServeConfig.from_settings(settings, model_uri=str(tmp / "m.keras"), api_keys=(f"ops:{KEY}",), poll_s=0,
                                       log_flush_s=1.0, feedback_flush_s=1.0, feedback_rate_per_s=5,
                                       feedback_burst=BURST, max_body_bytes=CAP)
    port, metrics_port = free_port(), free_port()
    sv.start_server(sv.deployment(cfg), port=port, host="127.0.0.1", metrics_port=metrics_port, num_cpus=2)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 240)
        yield dict(url=url, metrics=f"http://127.0.0.1:{metrics_port}/metrics", lake=Lake.from_settings(settings),
                   tmp=tmp)
    finally: sv.stop_server()


def _env(**extra) -> dict:
    "This process's environment without API keys, plus `extra`, for a `spam-mlops` child."
    return {k: v for k, v in os.environ.items() if k != "SPAM_MLOPS_SERVE_API_KEYS"} | extra


def _size(v: str) -> int:
    "An nginx size (`1m`, `512k`, `1000`) in bytes."
    v = str(v).lower()
    return int(v[:-1]) * {"k": 1024, "m": 1024 ** 2}[v[-1]] if v[-1] in "km" else int(v)


def _post(server, path, body=None, headers=H, **kw):
    return requests.post(f"{server['url']}{path}", json=body, headers=headers, timeout=30, **kw)


def _table(server, name):
    from spam_mlops.tables import Table
    return Table(server["lake"], name).read()


def _logged(server, ids) -> bool:
    "Whether every prediction id of `ids` is in the prediction log table."
    t = _table(server, "predictions")
    return len(t) > 0 and set(ids) <= set(t.prediction_id)


def test_every_answer_has_its_own_prediction_id(server):
    one = _post(server, "/api/predict", {"text": "WIN a FREE prize now"}).json()
    many = _post(server, "/api/predict/batch", {"texts": ["see you", "see you", "FREE prize"]}).json()["predictions"]
    ids = [one["prediction_id"]] + [p["prediction_id"] for p in many]
    assert len(set(ids)) == 4 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert len({p["request_id"] for p in many}) == 1  # one call, one request id; a prediction id per answer
    wait_until(lambda: _logged(server, ids), 30, "the four predictions in the table")
    t = _table(server, "predictions").set_index("prediction_id")
    assert set(t.loc[ids].api_key_id) == {"ops"} and t.loc[one["prediction_id"]].text == "WIN a FREE prize now"


def test_feedback_single_and_list_then_the_join(server):
    from spam_mlops.predlog import labelled_feedback
    texts = ["URGENT you won cash", "dinner at 8?", "call 09061701461 to claim"]
    ids = [p["prediction_id"] for p in _post(server, "/api/predict/batch", {"texts": texts}).json()["predictions"]]
    r = _post(server, "/api/feedback", {"prediction_id": ids[0], "label": "ham"})
    assert r.status_code == 202 and r.json() == {"accepted": 1, "duplicates": 0, "conflicts": 0}, r.text
    items = [{"prediction_id": ids[1], "label": "ham"}, {"prediction_id": ids[2], "label": "ham"},
             {"prediction_id": ids[2], "label": "spam"},  # the later one wins within a request
             {"prediction_id": "0" * 32, "label": "spam"}]  # no such prediction: quarantined at the join
    r = _post(server, "/api/feedback", {"items": items})
    assert r.status_code == 202 and r.json() == {"accepted": 3, "duplicates": 1, "conflicts": 1}, r.text
    wait_until(lambda: len(_table(server, "feedback")) >= 4, 30, "the feedback table holding both requests")
    # a second opinion on ids[0], later: the latest label wins at the join, the conflict is counted
    assert _post(server, "/api/feedback", {"prediction_id": ids[0], "label": "spam"}).status_code == 202
    wait_until(lambda: len(_table(server, "feedback")) >= 5 and _logged(server, ids), 30, "the second opinion")
    fb = _table(server, "feedback")
    assert set(fb.source) == {"api"} and set(fb.api_key_id) == {"ops"} and fb.received_at.dt.tz is not None
    rows, report = labelled_feedback(server["lake"])
    got = dict(zip(rows.prediction_id, rows.label, strict=True))
    assert {k: got[k] for k in ids} == {ids[0]: "spam", ids[1]: "ham", ids[2]: "spam"}, got
    assert rows.set_index("prediction_id").loc[ids, "text"].tolist() == texts  # the text from the prediction log
    assert report["quarantined"].get("unknown_prediction_id", 0) >= 1 and report["conflicts"] >= 1, report
    assert "0" * 32 not in got and server["lake"].exists(report["quarantine_file"])


@pytest.mark.parametrize("body,problem", [
    ({"prediction_id": "abc", "label": "maybe"}, "label: Input should be 'ham' or 'spam'"),
    ({"label": "spam"}, "prediction_id: field required"),
    ({"items": [{"prediction_id": "abc", "label": "ham"}] * 1001}, "items"),
    ({"items": [{"prediction_id": "abc", "label": "SPAM"}]}, "items.0.label"),
    ({"prediction_id": "abc", "label": "ham", "colour": "red"}, "colour"),
])
def test_bad_feedback_is_a_422_naming_the_field(server, body, problem):
    r = _post(server, "/api/feedback", body)
    assert r.status_code == 422 and problem in r.json()["error"], r.text


def test_malformed_json_no_key_and_body_cap(server):
    r = requests.post(f"{server['url']}/api/feedback", data=b'{"prediction_id": "a", "label":',
                      headers={"Content-Type": "application/json", **H}, timeout=10)
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"], r.text
    assert _post(server, "/api/feedback", {"prediction_id": "a", "label": "ham"}, headers={}).status_code == 401
    r = _post(server, "/api/feedback", {"prediction_id": "a", "label": "ham"}, headers={"X-API-Key": "nope"})
    assert r.status_code == 401 and "X-API-Key" in r.json()["error"]
    big = b'{"text": "' + b"a" * CAP + b'"}'  # over the cap: refused by its Content-Length, before it is read
    for path in ("/api/predict", "/api/feedback"):
        r = requests.post(f"{server['url']}{path}", data=big, headers={"Content-Type": "application/json", **H},
                          timeout=30)
        assert r.status_code == 413 and f"larger than {CAP} bytes" in r.json()["error"], (path, r.status_code)


def test_flood_is_rate_limited_and_counted(server):
    items = [{"prediction_id": f"flood-{i}", "label": "spam"} for i in range(1000)]
    assert _post(server, "/api/feedback", {"items": items}).status_code == 202  # within the burst
    r = _post(server, "/api/feedback", {"items": items})  # the bucket holds < 1,000 labels now
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and "rate limit of key ops" in r.json()["error"]
    wait_metric(server["metrics"], "ray_spam_api_feedback_labels_total",
                lambda s: total(s, outcome="rate_limited") >= 1000 and total(s, outcome="accepted") >= 1000)


def test_bulk_import_from_the_command_line(server, tmp_path):
    from spam_mlops.predlog import labelled_feedback
    pid = _post(server, "/api/predict", {"text": "Claim your FREE cruise now"}).json()["prediction_id"]
    by_id, by_text = tmp_path / "by_id.csv", tmp_path / "by_text.csv"
    by_id.write_text(f"prediction_id,label\n{pid},Spam\n,ham\nx1,maybe\n")
    by_text.write_text('text,label\n"Your parcel is held, pay the fee at http://p.co",spam\n')
    env = _env(SPAM_MLOPS_LAKE=str(server["lake"].root))
    r = subprocess.run([BIN / "spam-mlops", "feedback", str(by_id)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 1 and "1 accepted" in r.stdout and "2 refused" in r.stdout, r.stdout + r.stderr
    assert "line 3: no prediction_id" in r.stdout and "line 4: label 'maybe' is not ham or spam" in r.stdout
    r = subprocess.run([BIN / "spam-mlops", "feedback", str(by_text)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0 and "1 accepted" in r.stdout and "0 refused" in r.stdout, r.stdout + r.stderr
    wait_until(lambda: _logged(server, [pid]), 30, "the prediction in the log")
    rows, _ = labelled_feedback(server["lake"], quarantine=False)
    imported = rows[rows.source == "import"]
    assert imported.set_index("prediction_id").label.get(pid) == "spam"
    assert "Your parcel is held, pay the fee at http://p.co" in set(imported.text)  # its own text, no prediction


def test_production_fails_closed(tmp_path):
    "Without keys and SPAM_MLOPS_SERVE_REQUIRE_KEYS=true the API does not start; the prod overlay sets both."
    env = _env(SPAM_MLOPS_SERVE_REQUIRE_KEYS="true", SPAM_MLOPS_SERVE_MODEL_URI=str(tmp_path / "none.keras"),
               SPAM_MLOPS_LAKE=str(tmp_path / "lake"))
    r = subprocess.run([BIN / "spam-mlops", "serve", "--port", str(free_port())], capture_output=True, text=True,
                       env=env, timeout=180)
    assert r.returncode == 1 and "refusing to start an API without keys" in r.stdout + r.stderr, r.stdout + r.stderr
    prod = ROOT / "k8s" / "overlays" / "prod"
    patches = list(yaml.safe_load_all((prod / "patches.yaml").read_text()))
    api = next(d for d in patches if d["kind"] == "Deployment" and d["metadata"]["name"] == "spam-api")
    env_vars = {e["name"]: e for e in api["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env_vars["SPAM_MLOPS_SERVE_REQUIRE_KEYS"]["value"] == "true"
    assert env_vars["SPAM_MLOPS_SERVE_API_KEYS"]["valueFrom"]["secretKeyRef"]["optional"] is False
    cap = int(env_vars["SPAM_MLOPS_SERVE_MAX_BODY_BYTES"]["value"])
    kustomization = yaml.safe_load((prod / "kustomization.yaml").read_text())
    ops = [op for p in kustomization["patches"] if p.get("target", {}).get("kind") == "Ingress"
           for op in yaml.safe_load(p["patch"])]
    notes = next(op["value"] for op in ops if op["path"] == "/metadata/annotations")
    assert _size(notes["nginx.ingress.kubernetes.io/proxy-body-size"]) == cap  # ingress and app: the same cap
    base = list(yaml.safe_load_all((ROOT / "k8s" / "base" / "ray-serve.yaml").read_text()))
    paths = {p["path"] for d in base if d["kind"] == "Ingress" for r in d["spec"]["rules"] for p in r["http"]["paths"]}
    assert "/api/feedback" in paths
