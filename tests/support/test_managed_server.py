"""The managed-server helper itself, on small real servers (Python's http.server): ready only when it answers,
a server that dies while starting fails with its log, stop ends the whole process group (children too),
kill is a crash, and start again reuses the port."""
from __future__ import annotations

import sys
import textwrap

import psutil
import pytest
import requests

from support import ManagedServer, free_port, group_members, wait_until

pytestmark = pytest.mark.unit

# a server that forks a child first (as gunicorn and Ray do), then serves HTTP after a short delay
FORKING = textwrap.dedent("""
    import http.server, subprocess, sys, time
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    time.sleep(0.5)
    handler = http.server.SimpleHTTPRequestHandler
    http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), handler).serve_forever()
""")


def _server(tmp_path, port: int, code: str = FORKING) -> ManagedServer:
    url = f"http://127.0.0.1:{port}"
    return ManagedServer([sys.executable, "-c", code, str(port)], url, tmp_path / "server.log", cwd=tmp_path, url=url)


def test_start_waits_for_an_answer_and_stop_ends_the_group(tmp_path):
    srv = _server(tmp_path, free_port()).start(timeout=30)
    assert requests.get(srv.url, timeout=5).status_code == 200  # ready means it answers
    members = group_members(srv.pid)
    assert len(members) == 2 and srv.running  # the server and the child it forked
    assert srv.stop() is not None
    assert not srv.running and not group_members(srv.pid)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in members)
    with pytest.raises(requests.ConnectionError): requests.get(srv.url, timeout=2)


def test_kill_is_a_crash_and_start_again_reuses_the_port(tmp_path):
    srv = _server(tmp_path, free_port()).start(timeout=30)
    first = srv.pid
    srv.kill()
    assert srv.proc.returncode == -9 and not group_members(first)
    with srv:  # the same command again: same port
        assert srv.pid != first and requests.get(srv.url, timeout=5).ok
    assert not group_members(srv.pid)


def test_a_server_that_dies_while_starting_fails_with_its_log(tmp_path):
    srv = _server(tmp_path, free_port(), code="import sys; print('bad config: no such file', flush=True); sys.exit(3)")
    with pytest.raises(AssertionError, match="exited with 3 before it was ready:\n.*bad config: no such file"):
        srv.start(timeout=30)
    assert not srv.running


def test_a_server_never_ready_is_stopped_and_times_out(tmp_path):
    srv = _server(tmp_path, free_port(), code="import time; print('starting', flush=True); time.sleep(600)")
    with pytest.raises(TimeoutError, match="(?s)python.* ready: not within 2 s.*starting"):
        srv.start(timeout=2)
    assert not srv.running and not group_members(srv.pid)


def test_wait_until_names_what_and_why():
    def refused():
        raise ConnectionRefusedError("port closed")
    with pytest.raises(TimeoutError, match="thing up: not within 0.3 s .*ConnectionRefusedError: port closed"):
        wait_until(refused, 0.3, "thing up", every=0.05)
    assert wait_until(lambda: 42, 1, "answer") == 42
    with pytest.raises(AssertionError, match="broken"):  # an assertion in the predicate is not "not yet"
        wait_until(lambda: (_ for _ in ()).throw(AssertionError("broken")), 5, "x")
