"""Crash recovery of spam_mlops.cluster against a real Ray: a driver killed hard (SIGKILL, as the OOM killer does)
leaves processes behind, and the next `cluster.start` ends them and starts; a port held by another process
stops a start with one line naming the port and the holder."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from support import SPAM_TEXT, cli_server, free_port, train_champion, wait_until

from spam_mlops import cluster

# stands for Serve's HAProxy: a process that an actor starts in a session of its own, listening on a port
LISTEN = """import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
time.sleep(600)"""

DRIVER = """import json, time
from spam_mlops import cluster
cluster.start(1, purpose="crashtest")
print(json.dumps(cluster._RUN), flush=True)
time.sleep(600)
"""


def _env() -> dict[str, str]:
    "This process's environment without RAY_ADDRESS: the driver starts a local Ray."
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _listening(port: int) -> bool:
    conns = psutil.net_connections("tcp")
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns)


def _kill_all(pids):
    for pid in pids:
        try: os.kill(pid, signal.SIGKILL)
        except OSError: pass


@pytest.mark.slow
def test_start_after_driver_sigkill_ends_leftovers(tmp_path):
    """Measured: after a SIGKILL of the driver, Ray's dashboard and runtime-env agents live on. The next start (in
    another process) ends them, removes the dead run's file, and runs a task."""
    import ray
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True, env=_env(),
                              stderr=open(tmp_path / "driver.log", "wb"), start_new_session=True)
    left: list[psutil.Process] = []
    try:
        line = driver.stdout.readline()
        assert line, f"driver exited: {(tmp_path / 'driver.log').read_text()[-2000:]}"
        run = json.loads(line)
        run_file = Path(run["path"])
        assert json.loads(run_file.read_text())["driver"][0] == driver.pid and run["session_dir"]
        assert len(cluster.members(run["tag"], run["session_dir"])) >= 4  # GCS, raylet, agents, ...
        os.kill(driver.pid, signal.SIGKILL)  # the driver only, as the OOM killer does
        driver.wait(10)
        time.sleep(5)
        left = cluster.members(run["tag"], run["session_dir"])
        assert left, "expected Ray processes to outlive a SIGKILLed driver (measured: two agents)"
        names = sorted(p.name() for p in left)
        assert cluster.start(1, purpose="crashtest-restart")
        try:
            assert not [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], \
                "processes of the killed run are still running"
            assert cluster.members(run["tag"], run["session_dir"]) == [] and not run_file.exists()
            assert ray.get(ray.remote(lambda: 42).remote()) == 42
        finally: cluster.stop()
        print(f"ended {len(left)} processes left by the killed driver: {names}")
    finally:
        if driver.poll() is None: os.killpg(driver.pid, signal.SIGKILL)
        _kill_all([p.pid for p in left])
        cluster.reap()


def test_port_held_by_another_process_is_one_line(tmp_path):
    import ray
    port = free_port()
    holder = subprocess.Popen([sys.executable, "-c", LISTEN, str(port)])
    try:
        wait_until(lambda: _listening(port), 20, "the plain socket listening")
        with pytest.raises(cluster.ClusterError) as e:
            cluster.check_port(port, "127.0.0.1")
        msg = str(e.value)
        assert "\n" not in msg and f"port {port} on 127.0.0.1 is in use by pid {holder.pid} (python" in msg, msg
        with pytest.raises(cluster.ClusterError, match=f"port {port} .* pid {holder.pid}"):
            cluster.start(1, purpose="porttest", ports=(port,), host="127.0.0.1")
        assert not ray.is_initialized()  # refused before Ray started
    finally:
        holder.kill()
        holder.wait()
    cluster.check_port(port, "127.0.0.1")


@pytest.mark.slow
def test_serve_restarts_after_sigkill(tmp_path):
    """`spam-mlops serve` killed hard, then started again on the same ports: the new one answers /readyz and a
    prediction (measured before the cluster module: HAProxy kept the port and answered 500, the restart failed)."""
    import requests
    settings, model_uri, _ = train_champion(tmp_path)
    port, metrics_port = free_port(), free_port()
    env = {**_env(), "SPAM_MLOPS_LAKE": settings.lake, "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
           "SPAM_MLOPS_SERVE_MODEL_URI": model_uri, "SPAM_MLOPS_SERVE_MODEL_CACHE": str(tmp_path / "cache")}
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--port", str(port), "--host", "127.0.0.1", "--metrics-port", str(metrics_port)]
    ready = lambda: requests.get(f"{url}/readyz", timeout=2).status_code == 200  # a model loaded, not only a proxy
    first = cli_server(args, ready, tmp_path / "serve1.log", env=env)
    second = cli_server(args, ready, tmp_path / "serve2.log", env=env)
    left: list[psutil.Process] = []
    try:
        first.start(timeout=300)
        run = json.loads((cluster.RUN_DIR / f"serve-{first.pid}.json").read_text())
        procs = cluster.members(run["tag"], run["session_dir"])
        assert any("haproxy" in p.name() for p in procs), [p.name() for p in procs]
        os.kill(first.pid, signal.SIGKILL)  # the driver only, as the OOM killer does
        first.proc.wait(10)
        time.sleep(3)
        left = cluster.members(run["tag"], run["session_dir"])  # measured before the cluster module: HAProxy, agents
        print(f"left by the killed server: {sorted(p.name() for p in left)}")
        second.start(timeout=300)
        r = requests.post(f"{url}/api/predict", json={"text": SPAM_TEXT}, timeout=10)
        assert r.status_code == 200 and r.json()["prediction"] in ("spam", "ham"), r.text
        assert cluster.members(run["tag"], run["session_dir"]) == [], "the killed server's processes still run"
    finally:
        second.stop()
        _kill_all([p.pid for p in left])
        if first.proc and first.proc.poll() is None: first.kill()
        cluster.reap()  # whatever a failed check above left of the killed server
