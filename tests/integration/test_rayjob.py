"""The training and tuning RayJobs, run here the way KubeRay runs them (issue 17, item 1).

A RayJob is a RayCluster (a head with `num-cpus: "0"` and a worker group) plus an entrypoint that KubeRay's
submitter sends to the head's job API. The test builds that shape from separate raylets on this machine
(`spam_mlops.cluster.LocalCluster`), gives every node the environment its pod would get (the rendered container's
`envFrom` and `env`, with the Secrets' keys from `k8s/secrets.example.yaml`), submits the rendered entrypoint with
`ray job submit`, and waits for SUCCEEDED. The lake is a bucket on the moto S3 server and MLflow is a real server:
only the Service addresses (`minio:9000`, `mlflow:5000`, `redis:6379`) and the image's `/app` are mapped to the
test's servers and this checkout. Nothing of the YAML is restated here, so the test cannot drift from it.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import uuid

import mlflow
import pytest
from support import BIN, ROOT, require, wait_until
from support.manifests import secret_template

from spam_mlops.cluster import LocalCluster, members
from spam_mlops.config import get_settings
from spam_mlops.lake import Lake

sys.path.insert(0, str(ROOT / "scripts"))
import validate_manifests as vm  # noqa: E402

RAYJOBS = ("spam-train", "spam-tune")
TEST_SECRETS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "REDIS_PASSWORD": "",
                "MLFLOW_TRACKING_USERNAME": "spam-writer",
                "MLFLOW_TRACKING_PASSWORD": "writer-password"}  # pragma: allowlist secret


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return vm.render("prod", require(vm.find_tool("kubectl"), "kubectl", "run scripts/install-tools.sh"))


def pod_env(docs: list[dict], container: dict, rewrite: dict[str, str]) -> dict[str, str]:
    """The environment Kubernetes gives `container`: its envFrom ConfigMaps and Secrets, then its env (with
    `$(VAR)` expanded, as the kubelet does), every value passed through `rewrite` (substring → replacement)."""
    maps = {d["metadata"]["name"]: d.get("data") or {} for d in docs if d["kind"] == "ConfigMap"}
    keys = secret_template()
    secret = lambda name: {k: TEST_SECRETS[k] for k in keys[name]}  # noqa: E731 (the test value of each key)
    env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        if ref := src.get("configMapRef"): env |= maps[ref["name"]]
        if ref := src.get("secretRef"): env |= secret(ref["name"])
    for e in container.get("env") or []:
        if "value" in e: env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), e["value"])
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secret(ref["name"])[ref["key"]]
    for old, new in rewrite.items(): env = {k: v.replace(old, new) for k, v in env.items()}
    return env


def cluster_shape(job: dict) -> tuple[int, int]:
    "(head CPUs, worker CPUs) of the RayJob's cluster: the head's num-cpus, the worker container's CPU limit."
    spec = job["spec"]["rayClusterSpec"]
    (group,) = spec["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    cpus = group["rayStartParams"].get("num-cpus") or worker["resources"]["limits"]["cpu"]
    return int(spec["headGroupSpec"]["rayStartParams"]["num-cpus"]), int(cpus)


def head_container(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, corpus):
    "The corpus's first 600 messages (both classes): enough for the full-size notebooks to train in seconds."
    path = tmp_path_factory.mktemp("corpus") / "SMSSpamCollection"
    path.write_text("".join(corpus.open(encoding="utf-8").readlines()[:600]), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_entrypoint_runs_on_a_zero_cpu_head_and_registers_a_model(
        name, rendered, s3_env, mlflow_sqlite_server, small_corpus, tmp_path, monkeypatch):
    from ray.job_submission import JobSubmissionClient
    job = next(d for d in rendered if d["kind"] == "RayJob" and d["metadata"]["name"] == name)
    head_cpus, worker_cpus = cluster_shape(job)
    assert head_cpus == 0  # the shape this test exists for: the driver's node runs no task
    bucket = f"lake-{uuid.uuid4().hex[:10]}"
    repo = shutil.copytree(ROOT / "feature_repo", tmp_path / "feature_repo", ignore=shutil.ignore_patterns("data"))
    rewrite = {"http://minio:9000": s3_env, "http://mlflow:5000": mlflow_sqlite_server,
               "redis://:@redis:6379": "redis://127.0.0.1:6379", "s3://spam-mlops-lake": f"s3://{bucket}",
               "/app/feature_repo": str(repo), "/app/": f"{ROOT}/"}
    env = pod_env(rendered, head_container(job), rewrite)
    assert env["SPAM_MLOPS_LAKE"] == f"s3://{bucket}" and env["MLFLOW_TRACKING_URI"] == mlflow_sqlite_server

    # the lake the pipeline CronJob would have filled: one batch, curated, with features
    for k, v in env.items(): monkeypatch.setenv(k, v)
    from support import pipeline_settings
    pipeline_settings(f"s3://{bucket}", small_corpus)

    with LocalCluster(workers=(worker_cpus,), head_cpus=head_cpus, env=env, inherit=False) as lc:
        head_tag = lc.nodes[0]
        submit = subprocess.run([BIN / "ray", "job", "submit", "--address", lc.dashboard_url, "--no-wait",
                                 "--submission-id", f"{name}-test", "--", *job["spec"]["entrypoint"].split()],
                                capture_output=True, text=True, timeout=120)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        jobs = JobSubmissionClient(lc.dashboard_url)
        status = wait_until(lambda: (s := jobs.get_job_status(f"{name}-test")).is_terminal() and s, 900,
                            f"RayJob {name} finishing", every=2)
        logs = jobs.get_job_logs(f"{name}-test")
        assert status == "SUCCEEDED", logs[-4000:]
        info = jobs.get_job_info(f"{name}-test")
        assert info.driver_node_id and any(n.is_head_node and n.node_id == info.driver_node_id
                                           for n in lc.alive_nodes())
    assert not members(head_tag)

    notebook = job["spec"]["entrypoint"].split()[-1]
    records = [r for r in Lake.from_settings(get_settings()).list("runs/") if r.endswith(f"-{notebook}.ipynb")]
    assert len(records) == 1, records  # `spam-mlops run` kept the executed notebook in the lake (S3), not FAILED
    client = mlflow.MlflowClient(mlflow_sqlite_server)
    versions = client.search_model_versions(f"name = '{get_settings().model_name}'")
    assert versions, logs[-4000:]
    run = client.get_run(versions[0].run_id)
    assert run.info.status == "FINISHED"
    print(f"{name}: {len(versions)} version(s) registered, run {run.info.run_id}; "
          f"params {json.dumps(dict(list(run.data.params.items())[:6]))}")
