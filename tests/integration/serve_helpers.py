"""Pieces shared by tests (and benchmarks) that start a real Ray Serve API: waiting for readiness, reading Ray's
metrics endpoint, finding the serving processes; the corpus, free ports and champion registration come from
tests/support. A plain module, not a conftest: `from serve_helpers import ...` (tests/integration is on sys.path
under pytest's rootdir-relative imports)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import requests
from support import SPAM_TEXT, corpus_path, free_port, register_champion, train_champion  # noqa: F401


def register(tracking_uri: str, keras_file: Path, name: str) -> str:
    "Register `keras_file` as the champion of `name` on `tracking_uri` (tests/support); the version."
    return register_champion(tracking_uri, keras_file, name)


def champion(tmp: Path, epochs: int = 1, sample: int | None = 2000, name: str = "spam_detection"):
    "A small demo LSTM registered as the champion of `name` under `tmp` (tests/support): (settings, URI, version)."
    return train_champion(tmp, epochs=epochs, sample=sample, name=name)


def wait_ready(url: str, timeout: float = 240) -> float:
    "Wait until `url`/readyz answers 200; seconds waited. Raises TimeoutError."
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200: return time.monotonic() - start
        except requests.RequestException: pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready in {timeout} s")


def scrape(metrics_url: str, name: str) -> dict[str, float]:
    "Series of metric `name` from Ray's metrics endpoint, keyed by their label text (summed over duplicates)."
    out: dict[str, float] = {}
    for line in requests.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, value = line.rsplit(" ", 1)
            out[labels] = out.get(labels, 0.0) + float(value)
    return out


def total(series: dict[str, float], **labels) -> float:
    "Sum of the series whose labels include all of `labels`."
    return sum(v for k, v in series.items() if all(f'{n}="{x}"' in k for n, x in labels.items()))


def wait_metric(metrics_url: str, name: str, pred, timeout: float = 60) -> dict[str, float]:
    "Poll metric `name` until `pred(series)` holds; the series. Raises AssertionError after `timeout` s."
    end, s = time.monotonic() + timeout, {}
    while time.monotonic() < end:
        s = scrape(metrics_url, name)
        if pred(s): return s
        time.sleep(1)
    raise AssertionError(f"{name} did not reach the expected value in {timeout} s: {s}")


def serving_processes(app: str = "spam_api", deployment: str = "SpamAPI") -> dict[str, list]:
    """The processes of this driver's Ray session that serve traffic, by role: `replica` (the deployment's
    replica actors), `haproxy` (the HAProxy ingress), `proxy` (Serve's proxy actor), `controller`.
    Found among this process's descendants (Ray started in-process), so another Ray on the machine is never
    touched. Values are psutil.Process lists."""
    import psutil
    roles: dict[str, list] = {"replica": [], "haproxy": [], "proxy": [], "controller": []}
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try: cmd = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess): continue
        if f"ServeReplica:{app}:{deployment}" in cmd: roles["replica"].append(p)
        elif "haproxy" in p.name() or cmd.split(" ", 1)[0].endswith("haproxy"): roles["haproxy"].append(p)
        elif "ProxyActor" in cmd: roles["proxy"].append(p)
        elif "ServeController" in cmd: roles["controller"].append(p)
    return roles


def replica_states(app: str = "spam_api", deployment: str = "SpamAPI") -> dict[str, int]:
    "Replica counts by state (RUNNING, STARTING, ...) from `serve.status()`."
    from ray import serve
    try: d = serve.status().applications[app].deployments[deployment]
    except KeyError: return {}
    return {str(getattr(k, "value", k)): n for k, n in d.replica_states.items()}
