"""Serving on a real multi-node Ray cluster (issue 15, item 4): a 0-CPU head and two 1-CPU worker nodes, separate
raylets on this machine (`cluster.LocalCluster`). The API runs with 2 replicas, one per worker node, behind the
HAProxy ingress on the head (`proxy_location="HeadOnly"`); Ray's state API says where each replica runs. Then a
node failure under load: `hey` drives the API at a fixed rate while the second worker node is SIGKILLed (raylet,
its replica and every other process of the node) and a fresh node joins; fewer than 1 % of the requests fail, and
a replica runs on the new node with 2 replicas serving again within 60 s of the rejoin. Nothing is left behind."""
from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
from serve_helpers import replica_states, wait_ready
from support import SPAM_TEXT, free_port, train_champion, wait_until, worker_nodes

from spam_mlops import cluster
from spam_mlops import serve as sv

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from loadtest import hey  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

APP, DEPLOYMENT = "spam_api", "SpamAPI"
RATE, EPISODE_S, KILL_AT_S, REJOIN_AFTER_S = 200, 40, 8, 8  # modest: 2 cores shared with hey and other work
RECOVERY_S = 60  # the bound: full capacity back this long after the node rejoins


def replicas(c: cluster.LocalCluster) -> dict[str, str]:
    "The alive replica actors of the API by Ray's state API: actor id -> node id."
    from ray.util.state import list_actors
    actors = list_actors(address=c.dashboard_url, detail=True, filters=[("state", "=", "ALIVE")], limit=1000,
                         raise_on_missing_output=False)
    return {a.actor_id: a.node_id for a in actors if a.class_name == f"ServeReplica:{APP}:{DEPLOYMENT}"}


def predict(url: str) -> requests.Response:
    return requests.post(f"{url}/api/predict", json={"text": SPAM_TEXT}, timeout=10)


def haproxies(workdir: str) -> list[psutil.Process]:
    "The HAProxy processes running with this test's configuration (its private folder)."
    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            if "haproxy" in (p.info["name"] or "") and workdir in " ".join(p.info["cmdline"] or []): out.append(p)
        except psutil.Error: pass
    return out


def run_tag(p: psutil.Process) -> str | None:
    "The local Ray run `p` belongs to (its inherited tag), or None once `p` has ended."
    try:
        return None if p.status() == psutil.STATUS_ZOMBIE else p.environ().get(cluster.RUN_TAG, "")
    except psutil.NoSuchProcess: return None


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    "The API with 2 replicas spread over the two worker nodes of a local cluster, HAProxy on the head."
    if not shutil.which("hey"): pytest.fail("hey not found: apt-get install -y hey (.ci/run installs it)")
    tmp = tmp_path_factory.mktemp("multinode")
    settings, model_uri, version = train_champion(tmp)
    workdir = Path(tempfile.mkdtemp(prefix="hap-"))  # short: HAProxy's socket paths (plus Ray's hash) stay < 98
    env = sv.fast_ingress_env(str(workdir))  # on every node, as a pod's env: Serve reads it where it runs
    cfg = sv.ServeConfig.from_settings(settings, model_uri=model_uri, lake=str(tmp / "pred-lake"), poll_s=0,
                                       api_keys=(), model_cache=str(tmp / "cache"))
    port = free_port()
    tags: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items(): mp.setenv(k, v)  # the driver agrees with the nodes
        c = cluster.LocalCluster(workers=(1, 1), env=env, object_store_mb=200).start()
        tags += c.nodes.values()
        try:
            # one replica per worker node: half a CPU each keeps them off the 0-CPU head, one per node spreads them
            app = sv.deployment(cfg, replicas=2, replica_cpus=0.5, max_replicas_per_node=1)
            sv.start_server(app, port=port, host="127.0.0.1", address=c.address, proxy_location="HeadOnly")
            url = f"http://127.0.0.1:{port}"
            wait_ready(url)
            wait_until(lambda: replica_states().get("RUNNING") == 2, 120, "2 replicas RUNNING")
            yield {"cluster": c, "url": url, "version": version, "tags": tags, "workdir": str(workdir)}
        finally:
            try: sv.stop_server()
            finally:
                tags += [t for t in c.nodes.values() if t not in tags]
                c.stop()  # raises if a node's process outlived SIGKILL
    left = [p.pid for t in tags for p in cluster.members(t)] + [p.pid for p in haproxies(str(workdir))]
    shutil.rmtree(workdir, ignore_errors=True)
    assert not left, f"processes left by the multi-node serving test: {left}"


def test_replicas_on_both_worker_nodes_behind_haproxy(api):
    c = api["cluster"]
    placed = replicas(c)
    nodes = worker_nodes(c)
    assert len(placed) == 2 and set(placed.values()) == nodes and len(nodes) == 2, (placed, nodes)
    r = predict(api["url"])
    assert r.status_code == 200 and r.json()["prediction"] in ("spam", "ham"), r.text
    assert r.json()["model_version"] == api["version"]
    # each HAProxy by the run tag it inherited from its node; one that ends in between (an older process a reload
    # replaced, draining with -sf) has no node left to judge
    where = {p.pid: run_tag(p) for p in haproxies(api["workdir"])}
    where = {pid: tag for pid, tag in where.items() if tag is not None}
    assert where, "no HAProxy runs with this server's configuration"
    assert set(where.values()) == {c.nodes[0]}, f"HAProxy runs outside the head: {where}, head {c.nodes[0]}"


def test_node_failure_under_load(api):
    """hey at a fixed rate for the whole episode; the second worker node is killed a few seconds in and a new node
    joins a few seconds later. Errors (non-200 answers and transport errors) stay under 1 % of the requests, and
    within 60 s of the rejoin a replica runs on the new node, 2 replicas run and the API answers."""
    c, url = api["cluster"], api["url"]
    nodes = worker_nodes(c)
    out: dict = {}
    load = threading.Thread(target=lambda: out.update(hey(f"{url}/api/predict", EPISODE_S, rate=RATE, conc=20)))
    load.start()
    try:
        time.sleep(KILL_AT_S)
        killed = c.kill_node(2)  # the second worker node: raylet, its replica, agents; SIGKILL, as a lost machine
        wait_until(lambda: len(worker_nodes(c)) == 1, 60, "the GCS to mark the killed node dead")
        victim = (nodes - worker_nodes(c)).pop()
        time.sleep(REJOIN_AFTER_S)
        old = worker_nodes(c)
        c.add_node(1)
        rejoined = time.monotonic()
        api["tags"].append(c.nodes[max(c.nodes)])
        new = worker_nodes(c) - old
        assert len(new) == 1, (old, worker_nodes(c))
        new_node = new.pop()
    finally:
        load.join()
    total = out["ok"] + out["errors"]
    rate = out["errors"] / max(total, 1)
    print(f"episode: {total} requests, {out['errors']} errors ({rate:.3%}), codes {out['codes']}, killed pids "
          f"{len(killed)}; {out['rps']:.0f} req/s")
    assert total > 0.5 * RATE * EPISODE_S, out  # the load really ran
    assert rate < 0.01, out

    def recovered():
        placed = replicas(c)
        return (len(placed) == 2 and new_node in placed.values() and replica_states().get("RUNNING") == 2
                and predict(url).status_code == 200)
    wait_until(recovered, max(1.0, RECOVERY_S - (time.monotonic() - rejoined)),
               "a replica on the rejoined node and 2 replicas serving")
    print(f"back to 2 replicas (one on the new node) {time.monotonic() - rejoined:.1f} s after the rejoin")
    assert victim not in replicas(c).values()

