"""Faults under load (issue 9, point 2) against the real components: a Ray Serve replica SIGKILLed while `hey`
drives a steady load through the HAProxy ingress, and the object store (moto's S3 server, in its own process
so it can be killed) going away while the prediction log flushes. Every wait is bounded.

Redis faults of the feature store are in test_feature_store.py (the serving path does not use Redis)."""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from serve_helpers import (
    SPAM_TEXT,
    champion,
    replica_states,
    scrape,
    serving_processes,
    total,
    wait_metric,
    wait_ready,
)
from support import free_port, moto_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOG_METRIC = "ray_spam_api_prediction_log_rows_total"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    "A lake, a small LSTM registered as champion in a SQLite registry: (settings, model URI, version)."
    return champion(tmp_path_factory.mktemp("faults"))


@pytest.fixture
def serve_api():
    "Start the API (`serve_api(config, replicas)` → base URL, metrics URL); stopped at teardown."
    from spam_mlops import serve as sv
    started = []

    def start(cfg, replicas: int = 1):
        port, metrics_port = free_port(), free_port()
        started.append(True)
        sv.start_server(sv.deployment(cfg, replicas=replicas), port=port, host="127.0.0.1",
                        metrics_port=metrics_port, num_cpus=2)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout=240)
        return url, f"http://127.0.0.1:{metrics_port}/metrics"

    yield start
    if started: sv.stop_server()


def _hey(url: str, seconds: float, rate: int, conc: int) -> subprocess.Popen:
    "Start `hey` offering `rate` req/s (over `conc` workers) for `seconds` s of POST /api/predict."
    hey = shutil.which("hey")
    if not hey: pytest.fail("hey not found: `make tools` installs it")
    cmd = [hey, "-z", f"{seconds}s", "-c", str(conc), "-q", f"{rate / conc:.3f}", "-t", "10", "-m", "POST",
           "-T", "application/json", "-d", json.dumps({"text": SPAM_TEXT}), f"{url}/api/predict"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _hey_counts(out: str) -> tuple[dict[int, int], dict[str, int]]:
    "Status-code distribution and error distribution (connection errors, timeouts) of a hey report."
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    errors: dict[str, int] = {}
    if "Error distribution:" in out:
        for n, what in re.findall(r"\[(\d+)\]\s+(.+)", out.split("Error distribution:", 1)[1]):
            errors[what.strip()] = int(n)
    return codes, errors


def _haproxy_up() -> int:
    "Replica servers HAProxy routes to now (status UP in its stats, the backup fallback excluded)."
    path = os.environ.get("RAY_SERVE_HAPROXY_SOCKET_PATH")  # Ray puts it in a folder per node: <dir>/<node id>/<file>
    found = glob.glob(os.path.join(os.path.dirname(path), "*", os.path.basename(path))) if path else []
    if not found: return -1
    path = max(found, key=os.path.getmtime)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        s.connect(path)
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536): data += chunk
    lines = data.decode().splitlines()
    head = lines[0].lstrip("# ").split(",")
    up = 0
    for ln in lines[1:]:
        row = dict(zip(head, ln.split(","), strict=False))
        if row.get("svname") in (None, "", "FRONTEND", "BACKEND") or row.get("bck") == "1": continue
        if row.get("pxname", "").startswith(("stats", "prometheus", "health")): continue
        if row.get("status", "").startswith("UP"): up += 1
    return up


def test_replica_killed_under_load(model, serve_api, tmp_path):
    """Two replicas, 150 req/s for 40 s; one replica SIGKILLed 8 s in. Error rate over the whole episode < 1%,
    and two replicas RUNNING and routed to (HAProxy UP) again within the minute watched (seconds printed)."""
    from spam_mlops import serve as sv
    settings, uri, _ = model
    cfg = sv.ServeConfig.from_settings(settings, model_uri=uri, lake=str(tmp_path / "lake"), poll_s=0, log_flush_s=1.0)
    url, metrics = serve_api(cfg, replicas=2)
    for _ in range(20): assert requests.post(f"{url}/api/predict", json={"text": SPAM_TEXT}, timeout=10).ok
    before = {p.pid for p in serving_processes()["replica"]}
    assert len(before) == 2 and replica_states() == {"RUNNING": 2}

    rate, seconds, kill_at = 150, 40, 8
    hey = _hey(url, seconds, rate, conc=15)
    time.sleep(kill_at)
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    recovered = routed = None
    while time.monotonic() - killed < 60 and (recovered is None or routed is None):
        now = {p.pid for p in serving_processes()["replica"] if p.is_running() and p.status() != "zombie"}
        if recovered is None and replica_states() == {"RUNNING": 2} and len(now) == 2 and victim not in now:
            recovered = time.monotonic() - killed
        if routed is None and recovered is not None and _haproxy_up() == 2: routed = time.monotonic() - killed
        time.sleep(0.25)
    try: out = hey.communicate(timeout=seconds + 60)[0]
    except subprocess.TimeoutExpired:
        hey.kill()
        pytest.fail("hey did not finish")
    codes, errors = _hey_counts(out)
    sent = sum(codes.values()) + sum(errors.values())
    failed = sent - codes.get(200, 0)
    print(f"\nreplica kill: {sent} requests at {rate}/s offered over {seconds} s, {failed} failed "
          f"({100 * failed / max(sent, 1):.2f}%), codes {codes}, errors {errors}; "
          f"2 replicas RUNNING {recovered and round(recovered, 1)} s after the kill, HAProxy routing to 2 after "
          f"{routed and round(routed, 1)} s")
    assert sent > 0.8 * rate * seconds, out  # the load really flowed
    assert failed / sent < 0.01, out
    # recovery within the 60 s watched (the 30 s goal is a figure, printed above: tests assert no wall-clock
    # times, and on a loaded 2-core machine the new replica's TensorFlow import alone has taken 40 s)
    assert recovered is not None, f"replicas: {replica_states()}"
    assert routed is not None, f"HAProxy UP servers: {_haproxy_up()}"
    # the new replica answers: after recovery, a burst of requests raises the /api/predict count of two replicas
    # (only two are alive; the killed one's series may linger or vanish, but it cannot grow)
    def served(s):
        out = {}
        for k, v in s.items():
            if 'route="/api/predict"' in k and 'status="200"' in k:
                rid = re.search(r'replica="([^"]+)"', k).group(1)
                out[rid] = out.get(rid, 0) + v
        return out
    start = served(scrape(metrics, "ray_spam_api_requests_total"))
    with ThreadPoolExecutor(8) as pool:
        def ok(_): return requests.post(f"{url}/api/predict", json={"text": SPAM_TEXT}, timeout=10).ok
        oks = list(pool.map(ok, range(400)))
    assert all(oks)
    wait_metric(metrics, "ray_spam_api_requests_total",
                lambda s: sum(v > start.get(r, 0) for r, v in served(s).items()) >= 2, timeout=90)


# ---- object store unreachable while the prediction log flushes ----

@pytest.fixture
def moto(monkeypatch, tmp_path):
    "A killable S3 server; AWS_* variables point at it (set before Ray starts, so replicas inherit them)."
    m = moto_server(tmp_path / "moto.log").start()
    for k, v in {"AWS_ENDPOINT_URL": m.url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1", "SPAM_MLOPS_S3_ALLOW_HTTP": "true"}.items():
        monkeypatch.setenv(k, v)
    yield m
    m.stop()


def _logged_texts(settings) -> list[str]:
    "The texts of the lake's prediction log table, read as drift reads it."
    from spam_mlops.lake import Lake
    from spam_mlops.predlog import read_predictions
    log, _ = read_predictions(Lake.from_settings(settings), columns=["text"])
    return list(log.text) if len(log) else []


def test_object_store_down_while_log_flushes(model, moto, serve_api):
    """The S3 lake goes away: every request still answers 200; the log keeps `log_max_rows` rows and counts the
    rest as dropped (exactly requests − bound); when the store is back, the kept rows are written."""
    import boto3

    from spam_mlops import serve as sv
    from spam_mlops.config import get_settings
    settings, uri, _ = model
    bucket, bound, n = f"preds-{uuid.uuid4().hex[:8]}", 200, 500
    lake = get_settings(lake=f"s3://{bucket}/prod")
    cfg = sv.ServeConfig.from_settings(settings, model_uri=uri, lake=lake.lake, poll_s=0, log_flush_s=1.0,
                                       log_max_rows=bound)
    url, metrics = serve_api(cfg, replicas=1)

    warm = [f"before the outage {i}" for i in range(10)]
    for t in warm: assert requests.post(f"{url}/api/predict", json={"text": t}, timeout=10).ok
    wait_metric(metrics, LOG_METRIC, lambda s: total(s, outcome="written") >= len(warm), timeout=60)
    assert set(warm) <= set(_logged_texts(lake))

    moto.kill()
    marker = f"during the outage {uuid.uuid4().hex[:6]}"
    texts = [f"{marker} {i}" for i in range(n)]
    with ThreadPoolExecutor(4) as pool, requests.Session() as s:
        t0 = time.monotonic()
        codes = list(pool.map(lambda t: s.post(f"{url}/api/predict", json={"text": t}, timeout=10).status_code, texts))
        took = time.monotonic() - t0
    assert codes == [200] * n, {c: codes.count(c) for c in set(codes)}
    series = wait_metric(metrics, LOG_METRIC, lambda s: total(s, outcome="dropped") >= n - bound, timeout=60)
    time.sleep(3)  # a later flush must not count more: nothing else was sent
    series = scrape(metrics, LOG_METRIC)
    dropped, written_before = total(series, outcome="dropped"), total(series, outcome="written")
    print(f"\nobject store down: {n} requests in {took:.1f} s, all 200; dropped {dropped:.0f} (expected {n - bound}), "
          f"written while down {written_before - len(warm):.0f}")
    assert dropped == n - bound and written_before == len(warm)

    moto.start()  # same port; moto keeps nothing across restarts, so the bucket is gone
    # Lake remembers that it checked the bucket once (_ensure_bucket), so it does not re-create it on a write:
    # fine for MinIO (buckets persist), not for a store that lost its buckets. Create it as an operator would.
    boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1",
                 aws_access_key_id="test", aws_secret_access_key="test").create_bucket(Bucket=bucket)
    t0 = time.monotonic()
    series = wait_metric(metrics, LOG_METRIC, lambda s: total(s, outcome="written") >= len(warm) + bound, timeout=90)
    back = time.monotonic() - t0
    kept = [t for t in _logged_texts(lake) if t.startswith(marker)]
    print(f"store back: {total(series, outcome='written') - len(warm):.0f} buffered rows written within {back:.1f} s "
          f"(metric lag included); {len(kept)} outage rows read back from the lake")
    assert total(series, outcome="written") == len(warm) + bound
    assert len(kept) == bound and len(set(kept)) == bound
    assert total(series, outcome="dropped") == n - bound


def test_hey_report_parsing():
    "The hey report parser counts status codes and connection errors."
    out = ("Status code distribution:\n  [200]\t1490 responses\n  [500]\t3 responses\n\n"
           "Error distribution:\n  [2]\tPost \"http://x/api/predict\": EOF\n"
           "  [1]\tPost \"http://x\": read: connection reset\n")
    codes, errors = _hey_counts(out)
    assert codes == {200: 1490, 500: 3} and sum(errors.values()) == 3

