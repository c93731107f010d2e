"""Servers that tests start: one `ManagedServer` (a subprocess in its own process group, output to a log file,
ready when a URL answers or a predicate holds, stopped by pid with the whole group checked gone), one
`free_port`, one polling helper, and the commands of the servers the tests use (moto, MLflow, Prometheus,
Pushgateway, Alertmanager, the spam-mlops CLI)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import requests

from spam_mlops.cluster import free_port  # noqa: F401 (one free_port for the package and the tests)

BIN = Path(sys.executable).parent  # the venv's scripts: mlflow, spam-mlops, ...
IN_CI = os.environ.get("CI", "").lower() == "true"


def require(path: str | None, name: str, hint: str) -> str:
    "A tool's path; when it is missing the test fails under CI=true (CI installs every tool) and skips elsewhere."
    import pytest
    if path: return path
    msg = f"{name} not found: {hint}"
    if IN_CI: pytest.fail(msg)
    pytest.skip(msg)


def wait_until(pred: Callable[[], object], timeout: float, what: str, every: float = 0.2):
    """Poll `pred` until it returns something truthy (exceptions other than AssertionError count as "not yet");
    that value. TimeoutError naming `what` and the last exception after `timeout` s."""
    end, last = time.monotonic() + timeout, None
    while True:
        try:
            got = pred()
            if got: return got
        except AssertionError:
            raise
        except Exception as e:  # not up yet (connection refused, half-written file, ...): remember why
            last = e
        if time.monotonic() >= end: break
        time.sleep(every)
    why = f" (last error: {type(last).__name__}: {last})" if last else ""
    raise TimeoutError(f"{what}: not within {timeout} s{why}")


def answers(url: str, timeout: float = 2, **kw) -> bool:
    "Whether `url` gives an HTTP answer that is not a server error (a starting Prometheus says 503)."
    return requests.get(url, timeout=timeout, **kw).status_code < 500


def wait_http(url: str, timeout: float = 30) -> None:
    "Wait until `url` answers (see `answers`), or raise TimeoutError."
    wait_until(lambda: answers(url), timeout, f"{url} answering")


def group_members(pgid: int) -> list[psutil.Process]:
    "Live (not zombie) processes of process group `pgid`."
    out = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE: out.append(p)
        except (ProcessLookupError, psutil.Error): continue
    return out


def _signal_group(pgid: int, sig: int) -> None:
    try: os.killpg(pgid, sig)
    except ProcessLookupError: pass


class ManagedServer:
    """A server subprocess: its own session and process group, stdout and stderr appended to `log`, ready when
    `ready` (a URL that must answer, see `answers`, or a predicate) holds. `start` again after `stop` or `kill`
    restarts the same command (same port, same data). Use as a context manager or call `stop` in a finally."""

    def __init__(self, cmd: list[str],  # the command line; its first item is the program
                 ready: str | Callable[[], object],  # URL to poll, or a predicate returning truthy when ready
                 log: Path,  # file that receives the output (appended: a restart keeps what came before)
                 env: dict[str, str] | None = None,  # the environment (default: this process's)
                 cwd: Path | None = None,  # working directory (default: this process's)
                 name: str | None = None,  # for messages (default: the program's file name)
                 url: str | None = None):  # the server's base address, for its users (`.url`)
        self.cmd, self.ready, self.log, self.env, self.cwd = [str(c) for c in cmd], ready, Path(log), env, cwd
        self.url = url
        self.name = name or Path(self.cmd[0]).name
        self.proc: subprocess.Popen | None = None

    def __repr__(self): return f"ManagedServer({self.name}, pid={self.pid})"

    @property
    def pid(self) -> int | None: return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool: return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        "The last `n` characters of the log."
        return self.log.read_text("utf-8", "replace")[-n:] if self.log.exists() else ""

    def _ready(self):
        if self.proc.poll() is not None:
            code = self.proc.returncode
            raise AssertionError(f"{self.name} exited with {code} before it was ready:\n{self.log_tail()}")
        return answers(self.ready) if isinstance(self.ready, str) else self.ready()

    def start(self, timeout: float = 90) -> ManagedServer:
        "Start the command and wait until it is ready; stop it again (and fail) if it is not within `timeout` s."
        assert not self.running, f"{self} is already running"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_until(self._ready, timeout, f"{self.name} ready", every=0.3)
        except TimeoutError as e:
            self.stop()
            raise TimeoutError(f"{e}\n{self.log_tail()}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM to the process group, wait `timeout` s, then SIGKILL; asserts the process and every member of
        its group are gone. The exit code (None if never started)."""
        if self.proc is None: return None
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try: self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._assert_gone()
        return self.proc.returncode

    def kill(self) -> None:
        "SIGKILL to the whole process group (a crash, not a shutdown); asserts everything is gone."
        if self.proc is None: return
        _signal_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._assert_gone()

    def _assert_gone(self, grace: float = 10) -> None:
        "Members of the group left behind get `grace` s, then SIGKILL; the group must then be empty."
        pgid = self.proc.pid  # start_new_session: the leader's pid is the group id
        try: wait_until(lambda: not group_members(pgid), grace, f"{self.name}'s process group exiting")
        except TimeoutError:
            _signal_group(pgid, signal.SIGKILL)
            try: wait_until(lambda: not group_members(pgid), 5, f"{self.name}'s process group killed")
            except TimeoutError: pass
        left = [f"{p.pid} {p.name()}" for p in group_members(pgid)]
        assert not left, f"{self.name} (pid {pgid}) left processes in its group: {left}"
        assert not psutil.pid_exists(pgid) or psutil.Process(pgid).status() == psutil.STATUS_ZOMBIE, pgid

    def __enter__(self): return self.start() if not self.running else self

    def __exit__(self, *exc): self.stop()


# ---- the servers the tests use --------------------------------------------------------------------------------

def tool(name: str, hint: str) -> str:
    "A program on PATH (Debian's prometheus, ...); see `require`."
    return require(shutil.which(name), name, hint)


def moto_server(log: Path, port: int | None = None) -> ManagedServer:
    "moto's standalone S3 API server on `port` (default: a free one); `.url` is its endpoint. Not started yet."
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    return ManagedServer([sys.executable, "-m", "moto.server", "-p", str(port)], url, log, name="moto", url=url)


def mlflow_server(log: Path, backend_uri: str | None, artifacts: str, port: int | None = None,
                  env: dict[str, str] | None = None, app: str | None = None,
                  args: tuple[str, ...] = ()) -> ManagedServer:
    """`mlflow server` with one worker on `backend_uri` (sqlite:///... or postgresql+psycopg2://...; None: from
    MLFLOW_BACKEND_STORE_URI in `env`, as production passes it, outside argv), artifacts proxied to `artifacts` (a
    folder or s3:// URI), `app` its --app-name (basic-auth); `.url` is its address. Not started yet. `env` adds
    variables, `args` options."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    store = ["--backend-store-uri", backend_uri] if backend_uri else []
    return ManagedServer([BIN / "mlflow", "server", *(["--app-name", app] if app else []), "--host", "127.0.0.1",
                          "--port", str(port), *store, "--artifacts-destination", artifacts, "--workers", "1", *args],
                         f"{url}/health", log,
                         env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"} | (env or {}), name="mlflow",
                         url=url)


PROMETHEUS_HINT = ("run scripts/install-tools.sh (Debian packages prometheus, prometheus-pushgateway, "
                   "prometheus-alertmanager)")


def prometheus_server(folder: Path, config: dict, port: int | None = None) -> ManagedServer:
    """A real Prometheus with `config` (the prometheus.yml content, checked by promtool first), its data under
    `folder`; `.url` is its address. Not started yet."""
    import yaml
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    check = subprocess.run([tool("promtool", PROMETHEUS_HINT), "check", "config", str(folder / "prometheus.yml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    url = f"http://127.0.0.1:{port}"
    return ManagedServer([tool("prometheus", PROMETHEUS_HINT), f"--config.file={folder / 'prometheus.yml'}",
                          f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                         f"{url}/-/ready", folder / "prometheus.log", url=url)


def prom_query(url: str, expr: str, at: float | None = None) -> list:
    "Result of a Prometheus instant query (at time `at`, default now); fails on any error (HTTP, PromQL, warnings)."
    import requests
    r = requests.get(f"{url}/api/v1/query", params={"query": expr} | ({} if at is None else {"time": at}), timeout=10)
    body = r.json()
    assert r.ok and body["status"] == "success", f"{expr}: {body}"
    assert not body.get("warnings"), f"{expr}: {body['warnings']}"
    return body["data"]["result"]


def pushgateway_server(folder: Path, port: int | None = None) -> ManagedServer:
    "A real Prometheus Pushgateway; `.url` is its address. Not started yet."
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    return ManagedServer([tool("prometheus-pushgateway", PROMETHEUS_HINT), f"--web.listen-address=127.0.0.1:{port}"],
                         f"{url}/-/ready", folder / "pushgateway.log", url=url)


def alertmanager_server(folder: Path, config: dict, port: int | None = None) -> ManagedServer:
    """A real Alertmanager (Debian's prometheus-alertmanager) with `config` (the alertmanager.yml content, checked
    by `amtool check-config` first), one instance (no cluster port), its data under `folder`; `.url` is its address.
    Not started yet."""
    import yaml
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "alertmanager.yml").write_text(yaml.safe_dump(config))
    check = subprocess.run([tool("amtool", PROMETHEUS_HINT), "check-config", str(folder / "alertmanager.yml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    binary = shutil.which("prometheus-alertmanager") or tool("alertmanager", PROMETHEUS_HINT)
    url = f"http://127.0.0.1:{port}"
    return ManagedServer([binary, f"--config.file={folder / 'alertmanager.yml'}", f"--storage.path={folder / 'data'}",
                          f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                         f"{url}/-/ready", folder / "alertmanager.log", name="alertmanager", url=url)


def cli_server(args: list[str], ready: str | Callable[[], object], log: Path,
               env: dict[str, str] | None = None) -> ManagedServer:
    "`spam-mlops <args>` (e.g. serve ...) as a managed server. Not started yet."
    return ManagedServer([BIN / "spam-mlops", *args], ready, log, env=env, name=f"spam-mlops {args[0]}")


def worker_nodes(c) -> set[str]:
    "Node ids of the alive worker nodes (not the head) of a `cluster.LocalCluster`, by Ray's state API."
    return {n.node_id for n in c.alive_nodes() if not n.is_head_node}
