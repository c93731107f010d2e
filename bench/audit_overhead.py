"""CPU cost of the audit log on the API's request path, in-process (no Ray, model stubbed): one `POST /api/predict`
through the real ASGI app, with the audit log off (baseline, same run), to a file, and to the `spam_mlops.audit`
logger (its stderr handler pointed at /dev/null). Each round ends by writing its audit lines, inside its timing,
so the JSON building and the write are counted.

    python bench/audit_overhead.py [--requests 10000] [--rounds 5]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402

BODY = b'{"text": "Click here for FREE money! Call 09061701461 to claim your prize"}'
HEADERS = [(b"host", b"api"), (b"content-type", b"application/json"), (b"x-api-key", b"k1"),
           (b"x-request-id", b"3f2a-bench")]


def app_for(mode: str):
    "The API app over a stub model, its audit log off, to a file, or to the logger."
    from prometheus_client import CollectorRegistry

    from spam_mlops import api, predlog
    from spam_mlops import service as sv
    audit = os.path.join(tempfile.mkdtemp(), "audit.jsonl") if mode == "file" else None
    svc = sv.Service(sv.ServeConfig("stub.keras", "", None, poll_s=0, api_keys=("ops:k1",), audit_log=audit),
                     sv.Metrics("prometheus", CollectorRegistry()), sv.Predictor("stub", lambda x: None))
    svc.audit.flush_s = 3600  # no background flush: each round flushes its own lines, inside its timing
    if mode == "off": svc.audit.record = lambda *a, **k: None
    if mode == "logger": predlog._audit_logger().handlers[0].stream = open(os.devnull, "w")
    answer = {"prediction": "ham", "spam_probability": 0.1, "model_version": "stub", "request_id": "x"}

    async def predict_one(text, request_id): return answer
    return svc, api.build_app(svc, predict_one, echo_request_id=False)


def cpu_us_per_request(svc, app, n: int) -> float:
    "CPU time of `n` requests and of writing their audit lines, per request."
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/predict", "raw_path": b"/api/predict", "root_path": "", "query_string": b"",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000), "headers": HEADERS}

    async def receive(): return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(msg): pass

    async def run():
        for _ in range(n): await app(dict(scope), receive, send)
    t = time.process_time()
    asyncio.run(run())
    svc.audit.flush()
    return (time.process_time() - t) / n * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print("machine:", machine_info("fastapi", "starlette"))
    apps = {mode: app_for(mode) for mode in ("off", "file", "logger")}
    for svc, app in apps.values(): cpu_us_per_request(svc, app, 2_000)  # warm up
    results = {mode: [] for mode in apps}
    for _ in range(args.rounds):  # interleaved, so a burst of load elsewhere hits every mode
        for mode, (svc, app) in apps.items(): results[mode].append(cpu_us_per_request(svc, app, args.requests))
    base = statistics.median(results["off"])
    for mode, xs in results.items():
        med = statistics.median(xs)
        rounds = ", ".join(f"{x:.1f}" for x in xs)
        print(f"audit {mode:6}  {med:6.1f} us CPU per request (+{med - base:5.1f} vs off)  rounds {rounds}")
    for svc, _ in apps.values(): svc.audit.close()


if __name__ == "__main__":
    main()
