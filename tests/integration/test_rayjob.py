"""The training and tuning RayJobs, run here the way KubeRay runs them (issue 17, item 1), and the data pipeline's
curate and features submitted to its RayCluster as the CronJobs do (issue 15, item 5; last test).

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


# ---- the data pipeline's Ray cluster (k8s/base/pipeline-ray.yaml) and its CronJobs' submit script --------------
@pytest.mark.slow  # two notebooks under papermill as Ray jobs: 1-2 minutes alone, several on a loaded machine
def test_pipeline_cronjob_submits_curate_and_features_to_the_data_ray_cluster(
        rendered, s3_env, small_corpus, tmp_path, monkeypatch):
    """The RayCluster's shape (a head with `num-cpus: "0"`, one worker node) from separate raylets with the head pod's
    rendered environment; the lake ingested locally (ingest stays a local-engine step); then the rendered curate and
    features containers' command, the ConfigMap's script as the CronJob mounts it, with only RAY_ADDRESS mapped to
    this cluster's job API. Each stage must SUCCEED as a Ray job whose driver is on the head and write with the Ray
    engine; a retried pod of the same Job follows the run instead of submitting a second one; a failing stage fails
    the container."""
    from ray.job_submission import JobSubmissionClient

    from spam_mlops.curate import CURATED_TABLE
    from spam_mlops.features import FEATURES_MANIFEST
    from spam_mlops.ingest import RAW_TABLE
    from spam_mlops.tables import Table
    rc = next(d for d in rendered if d["kind"] == "RayCluster" and d["metadata"]["name"] == "spam-pipeline-ray")
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    bucket = f"lake-{uuid.uuid4().hex[:10]}"
    env = pod_env(rendered, head["template"]["spec"]["containers"][0],
                  {"http://minio:9000": s3_env, "s3://spam-mlops-lake": f"s3://{bucket}", "/app/": f"{ROOT}/"})
    assert env["SPAM_MLOPS_LAKE"] == f"s3://{bucket}"
    for k, v in env.items(): monkeypatch.setenv(k, v)
    from support import pipeline_settings
    settings = pipeline_settings(f"s3://{bucket}", small_corpus, stages="i")
    lake = Lake.from_settings(settings)

    cron = next(d for d in rendered if d["kind"] == "CronJob" and d["metadata"]["name"] == "data-pipeline")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    stages = {c["name"]: c for c in pod["initContainers"]}
    maps = {d["metadata"]["name"]: d["data"] for d in rendered if d["kind"] == "ConfigMap"}
    mount = tmp_path / "submit"
    for v in pod["volumes"]:
        if "configMap" in v:  # the ConfigMap's files where the container mounts them
            (path,) = {m["mountPath"] for c in stages.values() for m in c.get("volumeMounts", [])
                       if m["name"] == v["name"]}
            (mount / path.strip("/")).mkdir(parents=True, exist_ok=True)
            for f, text in maps[v["configMap"]["name"]].items(): (mount / path.strip("/") / f).write_text(text)
    job_name = f"data-pipeline-test-{uuid.uuid4().hex[:6]}"

    def run_container(c: dict, cluster: LocalCluster, job: str = job_name) -> subprocess.CompletedProcess:
        args = [a.replace("/opt/", f"{mount}/opt/") for a in c["args"]]
        cenv = {e["name"]: e.get("value") for e in c["env"]}
        assert cenv["RAY_ADDRESS"].startswith("http://spam-pipeline-ray-head-svc:")
        cenv |= {"RAY_ADDRESS": cluster.dashboard_url, "JOB_NAME": job}  # the Service, and the downward API's label
        return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path), **cenv})

    with LocalCluster(workers=(1,), head_cpus=0, env=env, inherit=False) as lc:
        head_tag = lc.nodes[0]
        jobs = JobSubmissionClient(lc.dashboard_url)
        for stage in ("curate", "features"):
            out = run_container(stages[stage], lc)
            assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
            notebook = stages[stage]["args"][-1]
            info = jobs.get_job_info(f"{job_name}-{notebook}")
            assert info.status == "SUCCEEDED" and info.runtime_env["env_vars"] == {"SPAM_MLOPS_DATA_ENGINE": "ray"}
            assert any(n.is_head_node and n.node_id == info.driver_node_id for n in lc.alive_nodes())
        # a retried pod of the same Job follows the finished run: no second submission
        again = run_container(stages["curate"], lc)
        assert again.returncode == 0 and "already submitted" in again.stdout, again.stdout + again.stderr
        assert len([j for j in jobs.list_jobs() if j.submission_id.startswith(job_name)]) == 2
        # a stage that fails fails the container (the Job), its Ray job FAILED
        bad = dict(stages["curate"], args=[*stages["curate"]["args"][:-1], "99_no_such_notebook"])
        failed = run_container(bad, lc, job=f"{job_name}-bad")
        assert failed.returncode != 0 and f"{job_name}-bad-99_no_such_notebook: FAILED" in failed.stdout, failed.stdout
    assert not members(head_tag)

    raw, cur = Table(lake, RAW_TABLE, settings), Table(lake, CURATED_TABLE, settings)
    metas = [m for m in cur.history().sort_values("version").meta if isinstance(m, dict)]
    assert metas[-1]["engine"] == "ray" and metas[-1]["raw_version"] == raw.version()
    manifest = lake.read_json(FEATURES_MANIFEST)
    assert manifest["engine"] == "ray" and manifest["rows"] == metas[-1]["rows_in"] > 500
    runs = [r for r in lake.list("runs/") if r.endswith(("-01_curate.ipynb", "-02_features.ipynb"))]
    assert len(runs) == 2, runs  # `spam-mlops run` kept each executed notebook in the lake
