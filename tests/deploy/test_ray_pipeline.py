"""The data pipeline on KubeRay, offline (issue 15, item 5): the RayCluster of k8s/base/pipeline-ray.yaml and the
pipeline CronJobs that submit curate and features to it (k8s/base/jobs.yaml, k8s/base/pipeline-submit.sh).

`pipeline_ray_problems` reads a rendered overlay and lists what breaks the promise: a Ray pod without the memory-backed
/dev/shm volume or whose object store and shm do not fit its memory limit, a worker group that does not autoscale, a
volume on a node's disk or a claim (the lake on S3 is the only storage), a stage not on the Ray engine, or a
ConfigMap named that the rendering does not hold. Each kind of breakage is made on a copy and must be reported.
"""
from __future__ import annotations

import copy
import json
import re
import sys

import pytest
from support import ROOT, require

sys.path.insert(0, str(ROOT / "scripts"))
import validate_manifests as vm  # noqa: E402

OVERLAYS = ["local", "prod"]
CLUSTER = "spam-pipeline-ray"
CRONJOBS = ("data-pipeline", "data-pipeline-bootstrap")
RAY_STAGES = {"curate": "01_curate", "features": "02_features"}  # on Ray Data, submitted to the cluster
LOCAL_STAGES = {"ingest": "00_ingest", "materialize": "03_feature_store"}  # local-engine steps in the Job's pod
STORAGE_OK = {"emptyDir", "configMap", "secret", "projected", "downwardAPI"}  # nothing on a node's disk, no claim


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    kubectl = require(vm.find_tool("kubectl"), "kubectl", "run scripts/install-tools.sh")
    return {o: vm.render(o, kubectl) for o in OVERLAYS}


def gib(q) -> float:
    "A Kubernetes memory quantity (4Gi, 512Mi, 1073741824) in GiB."
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti)?", str(q))
    assert m, f"unsupported quantity {q!r}"
    return float(m[1]) * {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}.get(m[2], 1) / 2**30


def by_name(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def groups(rc: dict):
    "(name, group spec) of the head and each worker group of a RayCluster."
    yield "head", rc["spec"]["headGroupSpec"]
    for g in rc["spec"].get("workerGroupSpecs") or []: yield g["groupName"], g


def stage_containers(cron: dict) -> dict[str, dict]:
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return {c["name"]: c for c in (pod.get("initContainers") or []) + pod["containers"]}


def submit_script(docs: list[dict], cron: dict, container: dict) -> str:
    "The script a submitting container runs: the file of the ConfigMap volume mounted where its args point."
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    script = next((a for a in container["args"] if a.endswith(".sh")), None)
    if script is None: raise LookupError(f"runs {container['args']}, not the submit script")
    folder, file = script.rsplit("/", 1)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == folder]
    (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    cm = by_name(docs, "ConfigMap").get(vol["configMap"]["name"])
    if cm is None: raise LookupError(f"ConfigMap {vol['configMap']['name']} is not rendered")
    return cm["data"][file]


def pipeline_ray_problems(docs: list[dict]) -> list[str]:
    "What breaks the data pipeline on KubeRay in one rendered overlay (empty: nothing)."
    p: list[str] = []
    rc = by_name(docs, "RayCluster").get(CLUSTER)
    if rc is None: return [f"no RayCluster {CLUSTER}"]
    maps = by_name(docs, "ConfigMap")
    spec = rc["spec"]
    # ---- memory: the object store in a memory-backed /dev/shm, both within the container's limit
    for name, g in groups(rc):
        pod, params = g["template"]["spec"], g.get("rayStartParams") or {}
        (c,) = pod["containers"]
        limits = c["resources"]["limits"]
        shm = [v for v in pod.get("volumes") or [] if v["name"] in
               {m["name"] for m in c.get("volumeMounts") or [] if m["mountPath"] == "/dev/shm"}]
        if len(shm) != 1 or (shm[0].get("emptyDir") or {}).get("medium") != "Memory":
            p.append(f"{name}: /dev/shm is not a memory emptyDir")
            continue
        size = gib(shm[0]["emptyDir"].get("sizeLimit", limits["memory"]))
        if "object-store-memory" not in params: p.append(f"{name}: object-store-memory is not set")
        elif gib(params["object-store-memory"]) > size: p.append(f"{name}: the object store exceeds /dev/shm")
        if size + 2 > gib(limits["memory"]): p.append(f"{name}: /dev/shm + 2 GiB exceed the memory limit")
        if name == "head" and c["resources"].get("requests") != limits: p.append("head: requests differ from limits")
    if spec["headGroupSpec"]["rayStartParams"].get("num-cpus") != "0": p.append("head: num-cpus is not 0")
    # ---- autoscaling: the in-tree autoscaler, with its own resources, and room to scale in every worker group
    if spec.get("enableInTreeAutoscaling") is not True: p.append("enableInTreeAutoscaling is not true")
    opts = spec.get("autoscalerOptions") or {}
    if not (opts.get("resources") or {}).get("limits"): p.append("autoscalerOptions.resources.limits missing")
    workers = spec.get("workerGroupSpecs") or []
    if not workers: p.append("no worker group")
    for g in workers:
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 0)
        if not lo < hi: p.append(f"{g['groupName']}: minReplicas {lo} / maxReplicas {hi} leave nothing to scale")
    # ---- storage: the lake on S3 only, never a node's path or a claim
    pods = [(f"RayCluster {name}", g["template"]["spec"]) for name, g in groups(rc)]
    pods += [(f"CronJob {n}", c["spec"]["jobTemplate"]["spec"]["template"]["spec"])
             for n, c in by_name(docs, "CronJob").items() if n in CRONJOBS]
    for where, pod in pods:
        for v in pod.get("volumes") or []:
            kinds = set(v) - {"name"}
            if not kinds <= STORAGE_OK: p.append(f"{where}: volume {v['name']} is {sorted(kinds - STORAGE_OK)}")
    for name, g in groups(rc):
        (c,) = g["template"]["spec"]["containers"]
        lakes = {maps[r["configMapRef"]["name"]]["data"].get("SPAM_MLOPS_LAKE") for r in c.get("envFrom") or []
                 if "configMapRef" in r and r["configMapRef"]["name"] in maps} - {None}
        if lakes != {lake for lake in lakes if lake.startswith("s3://")} or not lakes:
            p.append(f"{name}: SPAM_MLOPS_LAKE from the config ConfigMap is not an s3:// URI ({sorted(lakes)})")
        if any(e["name"] == "SPAM_MLOPS_LAKE" for e in c.get("env") or []):
            p.append(f"{name}: SPAM_MLOPS_LAKE overridden")
    # ---- every ConfigMap the cluster and the CronJobs name is rendered
    refs = set()

    def walk(x):
        if isinstance(x, dict):
            for k in ("configMapRef", "configMapKeyRef", "configMap"):
                if isinstance(x.get(k), dict): refs.add(x[k]["name"])
            for v in x.values(): walk(v)
        elif isinstance(x, list):
            for v in x: walk(v)
    walk(rc["spec"])
    for n in CRONJOBS: walk(by_name(docs, "CronJob")[n]["spec"])
    p += [f"ConfigMap {n} is named but not rendered" for n in sorted(refs - set(maps))]
    # ---- the stages: curate and features submitted to this cluster on the Ray engine, the others local
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_ports = {x["name"]: x["containerPort"] for x in head["ports"]}
    for n in CRONJOBS:
        cron = by_name(docs, "CronJob")[n]
        stages = stage_containers(cron)
        for stage, nb in LOCAL_STAGES.items():
            if stages[stage]["args"] != ["spam-mlops", "run", nb]:
                p.append(f"{n}/{stage}: args {stages[stage]['args']}")
        for stage, nb in RAY_STAGES.items():
            c = stages[stage]
            env = {e["name"]: e.get("value") for e in c.get("env") or []}
            if env.get("RAY_ADDRESS") != f"http://{CLUSTER}-head-svc:{head_ports['dashboard']}":
                p.append(f"{n}/{stage}: RAY_ADDRESS {env.get('RAY_ADDRESS')} is not the cluster's job API")
            if c["args"][-1] != nb: p.append(f"{n}/{stage}: runs {c['args']}, not {nb}")
            try: script = submit_script(docs, cron, c)
            except LookupError as e:
                p.append(f"{n}/{stage}: {e}")
                continue
            runtime = re.search(r"--runtime-env-json '([^']+)'", script)
            engine = (json.loads(runtime[1]).get("env_vars") or {}).get("SPAM_MLOPS_DATA_ENGINE") if runtime else None
            if engine != "ray": p.append(f"{n}/{stage}: the submitted stage's engine is {engine}, not ray")
            if not re.search(r'ray job submit .*\\\n(?:.*\\\n)*.*-- .*spam-mlops run "\$notebook"', script):
                p.append(f"{n}/{stage}: the script does not submit `spam-mlops run NOTEBOOK` as a Ray job")
    return p


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_data_pipeline_runs_on_the_ray_cluster(rendered, overlay):
    assert pipeline_ray_problems(rendered[overlay]) == []


def _break(docs: list[dict], how: str) -> list[dict]:
    "A copy of a rendering with one promise broken."
    docs = copy.deepcopy(docs)
    rc = by_name(docs, "RayCluster")[CLUSTER]
    head, worker = rc["spec"]["headGroupSpec"], rc["spec"]["workerGroupSpecs"][0]
    cron = by_name(docs, "CronJob")["data-pipeline"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if how == "no shm":
        worker["template"]["spec"]["volumes"] = [v for v in worker["template"]["spec"]["volumes"] if v["name"] != "shm"]
    elif how == "shm on disk":
        next(v for v in head["template"]["spec"]["volumes"] if v["name"] == "shm")["emptyDir"].pop("medium")
    elif how == "shm over the limit":
        next(v for v in worker["template"]["spec"]["volumes"] if v["name"] == "shm")["emptyDir"]["sizeLimit"] = "7Gi"
    elif how == "store over shm":
        head["rayStartParams"]["object-store-memory"] = str(8 * 2**30)
    elif how == "no autoscaler":
        rc["spec"]["enableInTreeAutoscaling"] = False
    elif how == "fixed size":
        worker["minReplicas"] = worker["maxReplicas"]
    elif how == "hostPath":
        worker["template"]["spec"]["volumes"].append({"name": "lake", "hostPath": {"path": "/data/lake"}})
    elif how == "PVC":
        pod["volumes"].append({"name": "lake", "persistentVolumeClaim": {"claimName": "lake"}})
    elif how == "local lake":
        cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("spam-mlops-config"))
        cm["data"]["SPAM_MLOPS_LAKE"] = "/data/lake"
    elif how == "local engine":
        cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("spam-pipeline-sub"))
        cm["data"]["submit.sh"] = cm["data"]["submit.sh"].replace('"SPAM_MLOPS_DATA_ENGINE": "ray"',
                                                                  '"SPAM_MLOPS_DATA_ENGINE": "local"')
    elif how == "not submitted":
        stage_containers(cron)["curate"]["args"] = ["spam-mlops", "run", "01_curate"]
    elif how == "unrendered ConfigMap":
        next(v for v in pod["volumes"] if v["name"] == "submit")["configMap"]["name"] = "spam-pipeline-submit"
    elif how == "unrendered config":
        head["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["name"] = "spam-mlops-config"
    return docs


BREAKAGES = {"no shm": "/dev/shm is not a memory emptyDir", "shm on disk": "head: /dev/shm is not a memory emptyDir",
             "shm over the limit": "cpu: /dev/shm + 2 GiB exceed", "store over shm": "head: the object store exceeds",
             "no autoscaler": "enableInTreeAutoscaling", "fixed size": "leave nothing to scale",
             "hostPath": "volume lake is ['hostPath']", "PVC": "volume lake is ['persistentVolumeClaim']",
             "local lake": "is not an s3:// URI", "local engine": "engine is local, not ray",
             "not submitted": "data-pipeline/curate: runs ['spam-mlops', 'run', '01_curate'], not the submit",
             "unrendered ConfigMap": "ConfigMap spam-pipeline-submit is named but not rendered",
             "unrendered config": "ConfigMap spam-mlops-config is named but not rendered"}


@pytest.mark.parametrize("how", BREAKAGES)
def test_each_breakage_is_reported(rendered, how):
    problems = pipeline_ray_problems(_break(rendered["prod"], how))
    assert any(BREAKAGES[how] in x for x in problems), problems


def test_autoscaler_rbac_is_this_cluster_only(rendered):
    """The head's ServiceAccount (its autoscaler sidecar) may get and patch this RayCluster and read pods, nothing
    more; the workers mount no token; a PodDisruptionBudget keeps the long-lived head through voluntary evictions."""
    docs = rendered["prod"]
    rc = by_name(docs, "RayCluster")[CLUSTER]
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]
    assert head["serviceAccountName"] == CLUSTER and head["automountServiceAccountToken"] is True
    assert all(g["template"]["spec"]["automountServiceAccountToken"] is False for g in rc["spec"]["workerGroupSpecs"])
    rules = by_name(docs, "Role")[CLUSTER]["rules"]
    granted = {(g, r, v, tuple(rule.get("resourceNames") or ())) for rule in rules for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    assert granted == {("ray.io", "rayclusters", "get", (CLUSTER,)), ("ray.io", "rayclusters", "patch", (CLUSTER,)),
                       ("", "pods", "get", ()), ("", "pods", "list", ())}
    binding = by_name(docs, "RoleBinding")[CLUSTER]
    assert binding["roleRef"]["name"] == CLUSTER
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": CLUSTER, "namespace": "spam-mlops"}]
    assert by_name(docs, "ServiceAccount")[CLUSTER]["automountServiceAccountToken"] is False  # only where asked
    pdb = [d for d in docs if d["kind"] == "PodDisruptionBudget" and
           d["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/name") == CLUSTER]
    assert [d["spec"]["selector"]["matchLabels"] for d in pdb] == [
        {"app.kubernetes.io/name": CLUSTER, "ray.io/node-type": "head"}]
    assert pdb[0]["spec"]["minAvailable"] == 1
    assert vm.check_custom(rc) == [] and vm.check_hardening(rc) == []


def test_raycluster_checks_can_fail(rendered):
    "validate_manifests checks a RayCluster as a RayJob's cluster, and the autoscaler container KubeRay adds."
    rc = copy.deepcopy(by_name(rendered["prod"], "RayCluster")[CLUSTER])
    rc["spec"]["workerGroupSpecs"][0].pop("groupName")
    rc["spec"]["autoscalerOptions"]["securityContext"]["readOnlyRootFilesystem"] = False
    del rc["spec"]["autoscalerOptions"]["resources"]["limits"]
    rc["spec"]["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] = False
    del rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["livenessProbe"]
    msgs = " ".join(vm.check_custom(rc) + vm.check_hardening(rc))
    for want in ("groupName is missing", "autoscalerOptions: readOnlyRootFilesystem", "resources.limits.cpu missing",
                 "needs the head pod's ServiceAccount token", "livenessProbe missing"):
        assert want in msgs, (want, msgs)


def test_submit_script_is_shellcheck_clean():
    import subprocess

    from test_manifests import tool
    out = subprocess.run([tool("shellcheck"), "k8s/base/pipeline-submit.sh"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout
