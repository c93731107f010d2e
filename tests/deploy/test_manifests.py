"""Offline validation of the delivery files (k8s/, argocd/, docker/, the CI workflow, scripts/deploy.sh).

No cluster and no Docker engine run here: every overlay is rendered with `kubectl kustomize`, every built-in
object validated strict against the Kubernetes schemas (kubernetes-validate), every custom resource checked
for the fields its controller requires, checkov and hadolint run on the real files. The tools come from
scripts/install-tools.sh (the .venv-tools venv, Debian's prometheus); with CI=true a missing tool fails.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from support import BIN, ROOT, ManagedServer, free_port, pg_exec, require
from support.manifests import secret_template

sys.path.insert(0, str(ROOT / "scripts"))
import validate_manifests as vm  # noqa: E402

OVERLAYS = ["local", "prod"]


def tool(name: str) -> str:
    "Path of a validation tool (see conftest.require)."
    return require(vm.find_tool(name), name, f"run scripts/install-tools.sh (tools venv {vm.tools_bin().parent})")


def tools_python() -> str:
    py = vm.tools_bin() / "python"
    hint = f"run scripts/install-tools.sh ({vm.tools_bin().parent})"
    return require(str(py) if py.is_file() else None, "tools venv", hint)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    "Every overlay rendered by kubectl kustomize."
    kubectl = tool("kubectl")
    return {o: vm.render(o, kubectl) for o in OVERLAYS}


def objects(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


# ---- rendering and schemas -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_system(rendered, overlay):
    docs = rendered[overlay]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    want = {("Namespace", "spam-mlops"), ("StatefulSet", "minio"), ("Job", "minio-bucket-init"),
            ("StatefulSet", "postgres"), ("Deployment", "mlflow"), ("Deployment", "redis"),
            ("CronJob", "data-pipeline-bootstrap"), ("CronJob", "data-pipeline"), ("RayJob", "spam-train"),
            ("RayJob", "spam-tune"), ("Deployment", "spam-api"), ("Service", "spam-api"), ("Ingress", "spam-api"),
            ("PodDisruptionBudget", "spam-api"), ("HorizontalPodAutoscaler", "spam-api"),
            ("Deployment", "prometheus"), ("Deployment", "grafana"), ("Deployment", "pushgateway"),
            ("CronJob", "drift-detection"), ("Role", "spam-drift-retrain"), ("NetworkPolicy", "default-deny-all")}
    assert want <= kinds, f"missing from {overlay}: {sorted(want - kinds)}"
    if overlay == "prod":
        canary = {("Rollout", "spam-api"), ("AnalysisTemplate", "spam-api-canary"), ("Service", "spam-api-canary")}
        assert canary <= kinds


@pytest.fixture(scope="module")
def builtin_validation(rendered) -> dict[str, tuple[list[str], list[str]]]:
    """kubernetes-validate --strict of every overlay, in one run of the tools venv's Python:
    overlay -> (problems, custom)."""
    code = ("import json,sys; sys.path.insert(0, sys.argv[1]); import validate_manifests as vm; "
            "print(json.dumps({o: vm.validate_builtin(docs) for o, docs in json.load(sys.stdin).items()}))")
    out = subprocess.run([tools_python(), "-c", code, str(ROOT / "scripts")], input=json.dumps(rendered),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_objects_validate_strict(rendered, builtin_validation, overlay):
    "Every built-in object validates strict (no unknown field) against the oldest and newest Kubernetes schemas."
    problems, custom = builtin_validation[overlay]
    assert problems == []
    # only custom resources lack a schema, and each of them is checked by test_custom_resources_*
    assert {c.split("/")[0] for c in custom} <= vm.CUSTOM_KINDS
    assert len(custom) == sum(d["kind"] in vm.CUSTOM_KINDS for d in rendered[overlay])


def test_strict_validation_catches_a_typo():
    "The schema check can fail: an unknown field (strict mode) and a wrong type are reported."
    def deployment(spec_extra=None, image="x:1"):
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
                "spec": {**(spec_extra or {}), "selector": {"matchLabels": {"a": "b"}},
                         "template": {"metadata": {"labels": {"a": "b"}},
                                      "spec": {"containers": [{"name": "c", "image": image}]}}}}
    docs = [deployment(), deployment({"replica": 2}), deployment(image=3)]
    code = ("import json,sys; sys.path.insert(0, sys.argv[1]); import validate_manifests as vm; "
            "print(json.dumps([vm.validate_builtin([d])[0] for d in json.load(sys.stdin)]))")
    out = subprocess.run([tools_python(), "-c", code, str(ROOT / "scripts")], input=json.dumps(docs),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    good, typo, wrong_type = json.loads(out.stdout)
    assert good == []
    assert typo and all("replica" in p for p in typo), typo
    assert wrong_type and all("image" in p for p in wrong_type), wrong_type


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_hardening_namespace_no_secrets(rendered, overlay):
    assert vm.check_overlay(rendered[overlay]) == []


def test_argocd_applications():
    "The root Application deploys argocd/apps; each of those syncs one slice of the prod overlay (k8s/apps/<app>)."
    root, *apps = vm.argocd_applications(tool("kubectl"))
    assert [vm.check_custom(a) for a in (root, *apps)] == [[]] * (1 + len(apps))
    assert root["spec"]["source"]["path"] == "argocd/apps"
    paths = {a["metadata"]["name"]: a["spec"]["source"]["path"] for a in apps}
    assert paths == {f"spam-mlops-{x}": f"k8s/apps/{x}" for x in ("stores", "monitoring", "pipeline", "serving")}
    for a in (root, *apps):
        assert a["spec"]["syncPolicy"]["automated"] == {"prune": True, "selfHeal": True}
        assert (ROOT / a["spec"]["source"]["path"] / "kustomization.yaml").is_file()


def test_custom_resource_checks_can_fail(rendered):
    "Each custom-resource check reports the field its controller would reject."
    prod = rendered["prod"]
    job = json.loads(json.dumps(objects(prod, "RayJob")["spam-train"]))
    del job["spec"]["entrypoint"]
    job["spec"]["shutdownAfterJobFinishes"] = False
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName")
    msgs = " ".join(vm.check_rayjob(job))
    assert "entrypoint" in msgs and "shutdownAfterJobFinishes" in msgs and "groupName" in msgs
    ro = json.loads(json.dumps(objects(prod, "Rollout")["spam-api"]))
    ro["spec"]["strategy"]["canary"]["steps"][0]["setWeight"] = 60
    ro["spec"]["strategy"]["canary"].pop("canaryService")
    msgs = " ".join(vm.check_rollout(ro))
    assert "weights must increase" in msgs and "canaryService" in msgs
    at = json.loads(json.dumps(objects(prod, "AnalysisTemplate")["spam-api-canary"]))
    at["spec"]["args"] = [{"name": "prometheus-address", "value": "http://x"}]
    assert "undeclared args ['canary-hash']" in " ".join(vm.check_analysis_template(at))
    app = vm.argocd_applications(tool("kubectl"))[1]
    del app["spec"]["source"]["repoURL"]
    assert vm.check_application(app) == ["spec.source.repoURL is missing"]


def test_hardening_check_can_fail(rendered):
    dep = json.loads(json.dumps(objects(rendered["local"], "Deployment")["spam-api"]))
    c = dep["spec"]["template"]["spec"]["containers"][0]
    del c["readinessProbe"], c["resources"]["limits"]
    c["securityContext"]["allowPrivilegeEscalation"] = True
    msgs = " ".join(vm.check_hardening(dep))
    assert "readinessProbe missing" in msgs and "limits.cpu missing" in msgs and "allowPrivilegeEscalation" in msgs


# ---- what the manifests promise --------------------------------------------------------------------------------------
def test_serving_ingress_pdb_hpa(rendered):
    for o in OVERLAYS:
        ing = objects(rendered[o], "Ingress")["spam-api"]
        rule = ing["spec"]["rules"][0]
        assert rule["host"] == "spam-api.local"
        assert [p["path"] for p in rule["http"]["paths"]] == ["/api/predict", "/api/feedback"]
        assert objects(rendered[o], "PodDisruptionBudget")["spam-api"]["spec"]["selector"]["matchLabels"] == \
            {"app.kubernetes.io/name": "spam-api"}
        api = objects(rendered[o], "Deployment")["spam-api"]["spec"]["template"]["spec"]["containers"][0]
        assert api["args"] == ["spam-mlops", "serve", "--port", "8000"]
        assert {p["containerPort"] for p in api["ports"]} == {8000, 8080}
    prod = rendered["prod"]
    assert objects(prod, "Ingress")["spam-api"]["spec"]["tls"][0]["secretName"] == "spam-api-tls"
    # in prod the Rollout owns the pods: the HPA scales it and the Deployment only lends its template
    assert objects(prod, "HorizontalPodAutoscaler")["spam-api"]["spec"]["scaleTargetRef"]["kind"] == "Rollout"
    assert objects(prod, "Deployment")["spam-api"]["spec"]["replicas"] == 0
    hpa = objects(rendered["local"], "HorizontalPodAutoscaler")["spam-api"]
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"


def test_pipeline_jobs_and_schedules(rendered):
    docs = rendered["prod"]
    # no pipeline Job in any rendering: the pipeline runs from its CronJobs only (never because of a sync)
    assert not any(n.startswith("pipeline-") for n in objects(docs, "Job"))
    cron = objects(docs, "CronJob")
    for name in ("data-pipeline", "data-pipeline-bootstrap"):
        pod = cron[name]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        stages = [(c["name"], c["args"]) for c in pod["initContainers"] + pod["containers"]]
        # curate and features are submitted to the data Ray cluster (tests/deploy/test_ray_pipeline.py)
        submit = ["bash", "/opt/spam-pipeline/submit.sh"]
        assert stages == [("ingest", ["spam-mlops", "run", "00_ingest"]), ("curate", [*submit, "01_curate"]),
                          ("features", [*submit, "02_features"]),
                          ("materialize", ["spam-mlops", "run", "03_feature_store"])], name
        source = {e["name"]: e.get("value") for e in pod["initContainers"][0]["env"]}.get("SPAM_MLOPS_SOURCE")
        # daily: the landing prefix; first run: the public corpus (the setting's default)
        assert source == {"data-pipeline": "s3://spam-mlops-lake/landing/", "data-pipeline-bootstrap": None}[name]
    assert cron["data-pipeline-bootstrap"]["spec"]["suspend"] is True
    assert not cron["data-pipeline"]["spec"].get("suspend")
    drift = cron["drift-detection"]
    assert drift["spec"]["schedule"] == "0 */6 * * *"
    drift_args = drift["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert drift_args == ["spam-mlops", "run", "07b_drift"]
    rj = objects(docs, "RayJob")
    assert rj["spam-train"]["spec"]["entrypoint"] == "spam-mlops run 04b_train"
    assert rj["spam-tune"]["spec"]["entrypoint"] == "spam-mlops run 05_tune"
    assert all(j["spec"]["suspend"] for j in rj.values())


def test_bucket_init_creates_prefixes(rendered):
    init = objects(rendered["local"], "Job")["minio-bucket-init"]
    script = init["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "mc mb --ignore-existing" in script
    prefixes = re.search(r"for prefix in ([\w ]+); do", script).group(1).split()
    assert {"raw", "curated", "features"} <= set(prefixes)


def test_backup_cronjob_dumps_with_the_servers_pg_dump(rendered):
    "Nightly backup: pg_dump from the PostgreSQL server's own image into a shared volume, then `spam-mlops backup`."
    docs = rendered["prod"]
    cron = objects(docs, "CronJob")["mlflow-backup"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and len(cron["spec"]["schedule"].split()) == 5
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    server = objects(docs, "StatefulSet")["postgres"]["spec"]["template"]["spec"]["containers"][0]["image"]
    (dump,), (main,) = pod["initContainers"], pod["containers"]
    assert dump["image"] == server  # same major version as the server
    out = dump["command"][dump["command"].index("-f") + 1]
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert main["args"] == ["spam-mlops", "backup"] and env["SPAM_MLOPS_BACKUP_DUMP"] == out
    assert env["SPAM_MLOPS_BACKUP_ARTIFACTS"].startswith("s3://spam-mlops-lake/")
    assert env["SPAM_MLOPS_BACKUP_DEST"].split("/")[2] == "spam-mlops-backups"
    mounts = lambda c: {m["name"]: m["mountPath"] for m in c["volumeMounts"]}  # noqa: E731
    assert mounts(dump)["backup"] == mounts(main)["backup"] == out.rsplit("/", 1)[0]
    assert {"name": "spam-mlops-backup-s3"} in [e["secretRef"] for e in main["envFrom"] if "secretRef" in e]
    script = objects(docs, "Job")["minio-bucket-init"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert 'mc mb --ignore-existing "lake/$BACKUP_BUCKET"' in script and "spam-mlops-backup" in script


def test_drift_rbac_is_least_privilege(rendered):
    docs = rendered["prod"]
    roles = objects(docs, "Role")
    rules = roles["spam-drift-retrain"]["rules"]
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert granted == {("ray.io", "rayjobs", "get"), ("ray.io", "rayjobs", "list"), ("ray.io", "rayjobs", "create")}
    assert [r for r in rules if "get" in r["verbs"]][0]["resourceNames"] == ["spam-train", "spam-tune"]
    # cluster-scoped: only the two read-only grants of the monitoring (kube-state-metrics discovers CRDs;
    # Prometheus reads the kubelets' volume stats), each bound to its own ServiceAccount
    cluster = {n: {(g, r, v) for rule in c["rules"] for g in rule["apiGroups"] for r in rule["resources"]
                   for v in rule["verbs"]} for n, c in objects(docs, "ClusterRole").items()}
    assert cluster == {
        "spam-mlops-kube-state-metrics-crds": {("apiextensions.k8s.io", "customresourcedefinitions", "list"),
                                               ("apiextensions.k8s.io", "customresourcedefinitions", "watch")},
        "spam-mlops-prometheus-kubelet": {("", "nodes", "list"), ("", "nodes", "watch"), ("", "nodes/metrics", "get")}}
    assert {n: [(s["name"], s["namespace"]) for s in b["subjects"]] for n, b in
            objects(docs, "ClusterRoleBinding").items()} == {
        "spam-mlops-kube-state-metrics-crds": [("kube-state-metrics", "spam-mlops")],
        "spam-mlops-prometheus-kubelet": [("prometheus", "spam-mlops")]}
    ksm = {(g, r, v) for rule in objects(docs, "Role")["kube-state-metrics"]["rules"] for g in rule["apiGroups"]
           for r in rule["resources"] for v in rule["verbs"]}
    assert {v for _, _, v in ksm} == {"list", "watch"}  # read-only
    binding = objects(docs, "RoleBinding")["spam-drift-retrain"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "spam-drift", "namespace": "spam-mlops"}]
    # only the pods that talk to the API server mount a token
    mounting = set()
    for d in docs:
        for _, spec in vm.pod_specs(d):
            if spec.get("automountServiceAccountToken") is not False: mounting.add(d["metadata"]["name"])
    # (and the data pipeline's Ray head, for its autoscaler: tests/deploy/test_ray_pipeline.py checks its Role)
    assert mounting == {"prometheus", "drift-detection", "kube-state-metrics", "spam-pipeline-ray"}
    assert objects(docs, "ServiceAccount")["default"]["automountServiceAccountToken"] is False


def test_network_policies_default_deny_and_flows(rendered):
    pols = objects(rendered["prod"], "NetworkPolicy")
    deny = pols["default-deny-all"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert not deny.get("ingress") and not deny.get("egress")

    def allowed_from(policy):
        names = set()
        for rule in pols[policy]["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                for e in peer.get("podSelector", {}).get("matchExpressions", []): names |= set(e["values"])
                names |= set(peer.get("podSelector", {}).get("matchLabels", {}).values())
        return names
    assert allowed_from("postgres") == {"mlflow", "spam-backup"}
    assert allowed_from("redis") == {"spam-pipeline"}
    assert "spam-api" not in allowed_from("redis") and "grafana" not in allowed_from("minio")
    # every pod of the system is selected by at least one policy besides the default deny
    selected = set()
    for name, p in pols.items():
        if name in ("default-deny-all", "allow-dns"): continue
        sel = p["spec"]["podSelector"].get("matchLabels", {})
        selected |= {sel.get("app.kubernetes.io/name") or sel.get("app.kubernetes.io/component")}
    pod_names = {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
                 for d in rendered["prod"] if d["kind"] in ("Deployment", "StatefulSet", "Job")}
    pod_names |= {d["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
                  for d in rendered["prod"] if d["kind"] == "CronJob"}
    assert len(pod_names) >= 11 and pod_names <= selected | {"ray"}, pod_names - selected
    assert "ray" in selected  # the training Ray pods, selected by their component label


def test_secrets_referenced_are_documented_never_committed(rendered):
    "Every Secret a manifest reads (name and key) is in the template and the runbook; none is committed."
    refs = set()

    def walk(x):
        if isinstance(x, dict):
            if "secretKeyRef" in x: refs.add((x["secretKeyRef"]["name"], x["secretKeyRef"]["key"]))
            if "secretRef" in x: refs.add((x["secretRef"]["name"], None))
            if "secretName" in x and isinstance(x["secretName"], str): refs.add((x["secretName"], None))
            for v in x.values(): walk(v)
        elif isinstance(x, list):
            for v in x: walk(v)
    for o in OVERLAYS: walk(rendered[o])
    template = secret_template()
    runbook = (ROOT / "nbs" / "explanations" / "runbook.md").read_text()
    for name, key in refs:
        assert name in template, f"Secret {name} is not in k8s/secrets.example.yaml"
        if key: assert key in template[name], f"{name}.{key} missing from the template"
        assert name in runbook, f"Secret {name} is not documented in the runbook"
    # every value is a placeholder, but for the one username the Prometheus config names (test_credentials.py)
    fixed = {("mlflow-metrics", "MLFLOW_TRACKING_USERNAME")}
    assert all(v == "CHANGE_ME" for n, d in template.items() for k, v in d.items() if (n, k) not in fixed), template
    tracked = subprocess.run(["git", "ls-files", "k8s", "argocd"], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    for f in tracked:
        if f.endswith((".yaml", ".yml")) and f != "k8s/secrets.example.yaml":
            kinds = {d.get("kind") for d in yaml.safe_load_all((ROOT / f).read_text()) if isinstance(d, dict)}
            assert "Secret" not in kinds, f"{f} defines a Secret"


def configmap_refs(x, found: set | None = None) -> set[str]:
    "The ConfigMap names an object's spec uses (envFrom, env valueFrom, volumes), wherever they are nested."
    found = set() if found is None else found
    if isinstance(x, dict):
        for k in ("configMapRef", "configMapKeyRef", "configMap"):
            if isinstance(x.get(k), dict) and "name" in x[k]: found.add(x[k]["name"])
        for v in x.values(): configmap_refs(v, found)
    elif isinstance(x, list):
        for v in x: configmap_refs(v, found)
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_configmap_named_is_rendered(rendered, overlay):
    """Every ConfigMap a rendered object names exists under that name. kustomize adds a hash to generated
    ConfigMaps and rewrites the references it knows; in a custom resource (RayJob) it rewrites only the fields
    k8s/base/kustomizeconfig.yaml declares, and a missed one leaves pods that never start."""
    names = {d["metadata"]["name"] for d in rendered[overlay] if d["kind"] == "ConfigMap"}
    missing = {f"{d['kind']}/{d['metadata']['name']} → {n}" for d in rendered[overlay]
               for n in configmap_refs(d.get("spec") or {}) if n not in names}
    assert not missing, sorted(missing)
    assert any(d["kind"] == "RayJob" and configmap_refs(d["spec"]) for d in rendered[overlay])


def test_configmap_check_can_fail(rendered):
    import copy
    job = copy.deepcopy(next(d for d in rendered["prod"] if d["kind"] == "RayJob"))
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["envFrom"] = [
        {"configMapRef": {"name": "spam-mlops-config"}}]  # what kustomize leaves without the field specs
    with pytest.raises(AssertionError, match="RayJob/spam-train → spam-mlops-config"):
        test_every_configmap_named_is_rendered({"prod": [*rendered["prod"], job]}, "prod")


def gib(q: str) -> float:
    "A Kubernetes memory quantity (4Gi, 512Mi, 1073741824) in GiB."
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti)?", str(q))
    assert m, f"unsupported quantity {q!r}"
    return float(m[1]) * units.get(m[2], 1) / 2**30


def ray_groups(job: dict):
    "(group name, rayStartParams, pod spec) of the head and every worker group of a RayJob."
    spec = job["spec"]["rayClusterSpec"]
    yield "head", spec["headGroupSpec"]["rayStartParams"], spec["headGroupSpec"]["template"]["spec"]
    for g in spec["workerGroupSpecs"]: yield g["groupName"], g["rayStartParams"], g["template"]["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjob_pods_fit_their_memory(rendered, overlay):
    """Each Ray pod's object store is sized explicitly, /dev/shm (memory-backed, so charged to the container's
    limit) holds it, and shm plus 2 GiB for the processes fit the limit. The head's requests equal its limits."""
    jobs = [d for d in rendered[overlay] if d["kind"] == "RayJob"]
    assert len(jobs) == 2
    for job in jobs:
        for group, params, pod in ray_groups(job):
            where = f"{job['metadata']['name']}/{group}"
            limits = pod["containers"][0]["resources"]["limits"]
            (shm,) = [v["emptyDir"] for v in pod["volumes"] if v["name"] == "shm"]
            assert shm["medium"] == "Memory", where
            store = gib(params["object-store-memory"])
            assert store <= gib(shm["sizeLimit"]) and gib(shm["sizeLimit"]) + 2 <= gib(limits["memory"]), where
            if group == "head":
                assert pod["containers"][0]["resources"]["requests"] == limits, where


# ---- checkov, hadolint, shellcheck -----------------------------------------------------------------------------------
def _checkov(args: list[str]) -> dict:
    out = subprocess.run([tool("checkov"), *args, "--skip-download", "--quiet", "--compact", "-o", "json"],
                         capture_output=True, text=True, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    report = json.loads(out.stdout)
    if isinstance(report, dict): return report
    return {"results": {"failed_checks": [f for r in report for f in r["results"]["failed_checks"]]},
            "summary": {"failed": sum(r["summary"]["failed"] for r in report)}}


def test_checkov_k8s_zero_failed(rendered, tmp_path):
    """checkov over k8s/ as kubectl kustomize renders it, every overlay in one run (checkov's own kustomize
    framework scanned only the prod overlay here). Skips: k8s/.checkov.yaml and checkov.io/skip annotations."""
    for o in OVERLAYS: (tmp_path / f"{o}.yaml").write_text(yaml.safe_dump_all(rendered[o]))
    report = _checkov(["-d", str(tmp_path), "--config-file", str(ROOT / "k8s" / ".checkov.yaml")])
    failed = [(f["check_id"], f["resource"]) for f in report["results"].get("failed_checks", [])]
    assert failed == []
    assert report["summary"]["passed"] > 1000


def test_checkov_skips_are_justified(rendered):
    "Each skipped check has a comment beside it (config file) or a reason after '=' (annotation)."
    lines = (ROOT / "k8s" / ".checkov.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*- CKV", line):
            assert lines[i - 1].strip().startswith("#") and len(lines[i - 1]) > 40, f"unjustified skip: {line.strip()}"
    for o in OVERLAYS:
        for d in rendered[o]:
            for k, v in (d["metadata"].get("annotations") or {}).items():
                if k.startswith("checkov.io/skip"):
                    check, _, reason = v.partition("=")
                    assert re.fullmatch(r"CKV2?_K8S_\d+", check) and len(reason) > 30, (d["metadata"]["name"], v)


def test_checkov_docker_zero_failed():
    report = _checkov(["-d", str(ROOT / "docker"), "--framework", "dockerfile"])
    assert report["results"].get("failed_checks", []) == []
    for f in (ROOT / "docker").glob("Dockerfile*"):
        for line in f.read_text().splitlines():
            if "checkov:skip=" in line:
                assert len(line.split(":", 2)[-1].split(":", 1)[-1]) > 30, f"unjustified skip in {f.name}: {line}"


@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile.jobs", "docker/Dockerfile.serve", "Dockerfile"])
def test_hadolint_clean(dockerfile):
    out = subprocess.run([tool("hadolint"), "--no-color", str(ROOT / dockerfile)], capture_output=True, text=True)
    assert (out.returncode, out.stdout.strip()) == (0, "")


def test_hadolint_can_fail(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    out = subprocess.run([tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "DL3007" in out.stdout


def test_shellcheck_scripts():
    out = subprocess.run([tool("shellcheck"), "scripts/deploy.sh", "scripts/install-tools.sh"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


# ---- images ----------------------------------------------------------------------------------------------------------
def test_top_level_dockerfile_is_the_serve_image():
    assert (ROOT / "Dockerfile").read_bytes() == (ROOT / "docker" / "Dockerfile.serve").read_bytes()


@pytest.mark.parametrize("name", ["jobs", "serve"])
def test_dockerfiles_multistage_pinned_nonroot(name):
    text = (ROOT / "docker" / f"Dockerfile.{name}").read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(froms) >= 2 and all(re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", f) for f in froms), froms
    assert "COPY --from=build" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert re.search(r"pip install --no-cache-dir -c constraints\.txt \.", text)
    if name == "jobs": assert "COPY --chown=10001:10001 nbs/ nbs/" in text
    else: assert 'CMD ["spam-mlops", "serve", "--port", "8000"]' in text


def test_dockerignore_keeps_build_inputs_only():
    lines = [x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines()
             if x.strip() and not x.startswith("#")]
    assert lines[0] == "**"
    copied = set()
    for f in (ROOT / "docker").glob("Dockerfile.*"):
        for m in re.findall(r"^COPY (?!--from)(?:--chown=\S+ )?(.+) \S+$", f.read_text(), re.M):
            copied |= set(m.split())
    for path in copied:
        assert f"!{path}" in lines, f"{path} is COPY'd but excluded by .dockerignore"
        assert (ROOT / path).exists() or path in ("constraints.txt", "README.md"), path


# ---- CI workflow and deploy script -----------------------------------------------------------------------------------
def test_ci_workflow_builds_and_bumps_the_prod_digests(tmp_path):
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "ci-cd.yaml").read_text())
    jobs = wf["jobs"]
    assert {"test", "images", "bump-prod"} <= set(jobs)
    assert jobs["images"]["needs"] == "test" and jobs["bump-prod"]["needs"] == "images"
    build = next(s for s in jobs["images"]["steps"] if s.get("uses", "").startswith("docker/build-push-action"))
    images = jobs["images"]["strategy"]["matrix"]["image"]
    built = {build["with"]["file"].replace("${{ matrix.image }}", m) for m in images}
    assert built == {"docker/Dockerfile.jobs", "docker/Dockerfile.serve"} and all((ROOT / f).is_file() for f in built)
    assert build["with"]["push"] is True and "sha-${{ github.sha }}" in build["with"]["tags"]
    # the bump step's command, run here on a copy of the repo's overlay, pins exactly the two images by digest
    step = next(s for s in jobs["bump-prod"]["steps"] if "set-image-digest" in s.get("name", ""))
    work = tmp_path / "repo"
    shutil.copytree(ROOT / "k8s", work / "k8s")
    shutil.copytree(ROOT / "argocd", work / "argocd")
    shutil.copytree(ROOT / "monitoring", work / "monitoring")
    digests = {"DIGEST_JOBS": "sha256:" + "1" * 64, "DIGEST_SERVE": "sha256:" + "2" * 64}
    out = subprocess.run(["bash", "-ec", step["run"]], cwd=work, capture_output=True, text=True,
                         env={**os.environ, **digests})
    assert out.returncode == 0, out.stderr
    docs = vm.render(work / "k8s" / "overlays" / "prod", tool("kubectl"))
    images = {c["image"] for d in docs for _, spec in vm.pod_specs(d) for c in spec.get("containers", [])}
    ours = {i for i in images if "spam-mlops-" in i}
    assert ours == {"ghcr.io/spam-mlops/spam-mlops-jobs@" + digests["DIGEST_JOBS"],
                    "ghcr.io/spam-mlops/spam-mlops-serve@" + digests["DIGEST_SERVE"]}


def test_deploy_dry_run_renders_and_validates_without_a_cluster():
    tool("kubectl"), tool("promtool"), tools_python()
    env = {**os.environ, "KUBECONFIG": "/nonexistent"}  # no cluster: the dry run must not need one
    out = subprocess.run(["bash", "scripts/deploy.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK: every overlay renders and validates" in out.stdout and "dry run OK" in out.stdout
    bad = subprocess.run(["bash", "scripts/deploy.sh", "--dry-run", "staging"], cwd=ROOT, capture_output=True,
                         text=True, env=env)
    assert bad.returncode != 0 and "no overlay 'staging'" in bad.stderr
    # without --dry-run it needs a cluster, and says so before touching anything
    real = subprocess.run(["bash", "scripts/deploy.sh", "local"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert real.returncode == 1 and "no cluster reachable" in real.stderr


# ---- the MLflow server exactly as the manifest starts it -------------------------------------------------------------
def _expand(arg: str, env: dict[str, str]) -> str:
    "Kubernetes' $(VAR) expansion of container args (unknown references stay as written, as the kubelet does)."
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


@pytest.mark.integration
def test_mlflow_manifest_args_start_a_real_server(rendered, s3_server, tmp_path):
    """The rendered MLflow container's args and env, expanded as the kubelet would, start a real `mlflow server`
    on the PostgreSQL here with artifacts on the S3 test server, its basic-auth app configured from the rendered
    ConfigMap mlflow-auth: it answers /health, serves /metrics (--expose-prometheus), refuses anonymous calls (401),
    accepts the in-cluster Host headers it lists (with and without port) and refuses others."""
    import uuid

    import boto3
    import requests

    dep = objects(rendered["local"], "Deployment")["mlflow"]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][:2] == ["mlflow", "server"]
    db, port = f"spam_manifest_{uuid.uuid4().hex[:8]}", free_port()
    admin = ("admin", uuid.uuid4().hex)
    secrets = {"PGUSER": "postgres", "PGPASSWORD": "unused-with-trust-auth", "AWS_ACCESS_KEY_ID": "test",
               "AWS_SECRET_ACCESS_KEY": "test", "MLFLOW_AUTH_ADMIN_USERNAME": admin[0],
               "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1], "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex}
    env = {e["name"]: e.get("value", secrets.get(e["name"])) for e in c["env"]}
    assert None not in env.values(), env
    ini = objects(rendered["local"], "ConfigMap")["mlflow-auth"]["data"]["basic_auth.ini"]
    (tmp_path / "basic_auth.ini").write_text(ini.replace("@postgres:5432/mlflow", f"@127.0.0.1:5432/{db}")
                                             .replace("//postgres:5432/mlflow", f"//127.0.0.1:5432/{db}"))
    env |= {"MLFLOW_S3_ENDPOINT_URL": s3_server, "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
            "MLFLOW_BACKEND_STORE_URI": env["MLFLOW_BACKEND_STORE_URI"].replace("//postgres:5432/mlflow",
                                                                                f"//127.0.0.1:5432/{db}")}
    args = [_expand(a, env) for a in c["args"][2:]]
    assert not any("$(" in a for a in args), args
    # the cluster's addresses become this machine's: the Service names, the pod's listen address and port
    args = [a.replace("@postgres:5432/mlflow", f"@127.0.0.1:5432/{db}").replace("--host=0.0.0.0", "--host=127.0.0.1")
             .replace("--port=5000", f"--port={port}").replace("/tmp/prometheus-multiproc", str(tmp_path / "prom"))
            for a in args]
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket="spam-mlops-lake")
    pg_exec(f"CREATE DATABASE {db}")
    url = f"http://127.0.0.1:{port}"
    srv = ManagedServer([BIN / "mlflow", "server", *args], f"{url}/health", tmp_path / "mlflow.log",
                        env={**os.environ, **env}, name="mlflow (manifest args)")
    try:
        srv.start(timeout=120)
        search = "/api/2.0/mlflow/experiments/search?max_results=1"
        assert requests.get(url + search, headers={"Host": "mlflow:5000"}, timeout=10).status_code == 401
        auth = requests.Session()
        auth.auth = admin
        for host in ("mlflow", "mlflow:5000", "mlflow.spam-mlops.svc.cluster.local:5000", "mlflow.spam-mlops:5000"):
            assert auth.get(url + search, headers={"Host": host}, timeout=10).status_code == 200, host
        assert auth.get(url + search, headers={"Host": "attacker.example:5000"}, timeout=10).status_code == 403
        svc = {"Host": "mlflow:5000"}  # what in-cluster clients send (MLFLOW_TRACKING_URI=http://mlflow:5000)
        r = auth.post(f"{url}/api/2.0/mlflow/experiments/create", json={"name": "manifest-check"}, headers=svc,
                          timeout=10)
        assert r.ok, r.text
        exp = auth.get(f"{url}/api/2.0/mlflow/experiments/get", params={"experiment_id": r.json()["experiment_id"]},
                           headers=svc, timeout=10).json()["experiment"]
        assert exp["artifact_location"].startswith("mlflow-artifacts:")  # proxied: clients need no S3 credentials
        # Prometheus scrapes the pod by its IP (kubernetes_sd): the Host header is the pod's address. Under
        # basic-auth /metrics answers the admin only (fail-closed: no permission rule covers it), anonymous gets 401
        pod = {"Host": "10.42.0.17:5000"}
        assert requests.get(f"{url}/metrics", headers=pod, timeout=10).status_code == 401
        metrics = auth.get(f"{url}/metrics", headers=pod, timeout=10)
        assert metrics.status_code == 200, metrics.text[:200]
        assert re.search(r"^mlflow_\w+", metrics.text, re.M), metrics.text[:500]
    finally:
        srv.stop(timeout=30)
        pg_exec(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def _set_variables(docs: list[dict]) -> set[str]:
    "Every variable a rendered object sets: container `env` entries and ConfigMap keys, anywhere in the object."
    out: set[str] = set()

    def walk(x):
        if isinstance(x, dict):
            env = x.get("env")
            if isinstance(env, list): out.update(e["name"] for e in env if isinstance(e, dict) and "name" in e)
            for v in x.values(): walk(v)
        elif isinstance(x, list):
            for v in x: walk(v)
    for d in docs:
        walk(d)
        if d["kind"] == "ConfigMap": out |= set(d.get("data") or {})
    return out


def _known_variables() -> set[str]:
    "The variables spam_mlops.config reads: every field of Settings and of each section, by its env name."
    from pydantic import AliasChoices

    from spam_mlops import config
    out = set()
    for cls in (config.Settings, config.ServeSettings, config.DriftSettings, config.RetrainSettings,
                config.BackupSettings, config.EngineSettings):
        for name, info in cls.model_fields.items():
            alias = info.validation_alias
            out |= set(map(str, alias.choices)) if isinstance(alias, AliasChoices) else {config.env_name(cls, name)}
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_spam_mlops_variable_is_one_config_reads(rendered, overlay):
    "A renamed or mistyped SPAM_MLOPS_* variable in a manifest would be ignored silently: none may be unknown."
    unknown = {v for v in _set_variables(rendered[overlay]) if v.startswith("SPAM_MLOPS_")} - _known_variables()
    assert not unknown, f"{overlay} sets variables spam_mlops.config does not read: {sorted(unknown)}"


# ---- NetworkPolicies, evaluated: the flows the system needs pass, others do not --------------------------------------
def _matches(selector: dict, labels: dict) -> bool:
    "A label selector (matchLabels, matchExpressions with In/NotIn/Exists/DoesNotExist) against labels."
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()): return False
    for e in selector.get("matchExpressions") or []:
        has, val = e["key"] in labels, labels.get(e["key"])
        ok = {"In": has and val in e.get("values", []), "NotIn": not has or val not in e.get("values", []),
              "Exists": has, "DoesNotExist": not has}[e["operator"]]
        if not ok: return False
    return True


def _peer_ok(peer: dict, other: dict, own_ns: str) -> bool:
    "Whether one from/to peer admits `other` = {'ns': name, 'labels': {...}} (or {'ip': True} outside the cluster)."
    if "ipBlock" in peer: return other.get("ip", False)
    if other.get("ip"): return False
    ns_ok = (_matches(peer["namespaceSelector"], {"kubernetes.io/metadata.name": other["ns"]})
             if "namespaceSelector" in peer else other["ns"] == own_ns)
    return ns_ok and _matches(peer.get("podSelector", {}), other["labels"])


def _allowed(policies: list[dict], pod: dict, direction: str, other: dict, port: int, ns: str) -> bool:
    """Kubernetes semantics: isolated in a direction iff some policy selecting the pod has that type; then any
    rule may allow."""
    selecting = [p for p in policies
                 if _matches(p["spec"]["podSelector"], pod) and direction in p["spec"]["policyTypes"]]
    if not selecting: return True
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for p in selecting:
        for rule in p["spec"].get(key) or []:
            peers, ports = rule.get(peers_key), rule.get("ports")
            if peers is not None and not any(_peer_ok(x, other, ns) for x in peers): continue
            if ports is not None and not any(pt.get("port") in (port, None) for pt in ports): continue
            return True
    return False


def test_network_policies_allow_exactly_the_needed_flows(rendered):
    docs, ns = rendered["prod"], "spam-mlops"
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    pods = {}
    for d in docs:
        for where, _spec in vm.pod_specs(d):
            tpl = {"Deployment": "template", "StatefulSet": "template", "Job": "template"}.get(d["kind"])
            rc = d["spec"].get("rayClusterSpec", d["spec"])  # a RayJob's cluster, or a RayCluster's spec
            labels = (d["spec"]["template"]["metadata"]["labels"] if tpl else
                      d["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"] if d["kind"] == "CronJob" else
                      (rc["headGroupSpec"] if where == "head" else
                       rc["workerGroupSpecs"][0])["template"]["metadata"]["labels"])
            pods[labels["app.kubernetes.io/name"] + ("-head" if where == "head" else "")] = labels
    pods["dns"] = {"k8s-app": "kube-dns"}

    def flow(src: str, dst: str, port: int) -> bool:
        s = {"ns": "ingress-nginx", "labels": {}} if src == "ingress" else {"ns": ns, "labels": pods[src]}
        if dst == "internet":
            return _allowed(policies, pods[src], "Egress", {"ip": True}, port, ns)
        d_ns = "kube-system" if dst == "dns" else ns
        out = src == "ingress" or _allowed(policies, pods[src], "Egress", {"ns": d_ns, "labels": pods[dst]}, port, ns)
        inn = dst == "dns" or _allowed(policies, pods[dst], "Ingress", s, port, ns)
        return out and inn
    needed = [("ingress", "spam-api", 8000), ("spam-api", "mlflow", 5000), ("spam-api", "minio", 9000),
              ("spam-train-head", "mlflow", 5000), ("spam-train-head", "minio", 9000),
              ("spam-train", "spam-train-head", 6379), ("spam-tune-head", "spam-tune", 10002),
              ("spam-pipeline", "minio", 9000), ("spam-pipeline", "redis", 6379),
              ("spam-pipeline", "internet", 443), ("mlflow", "postgres", 5432), ("mlflow", "minio", 9000),
              ("spam-drift", "minio", 9000), ("spam-drift", "mlflow", 5000), ("spam-drift", "pushgateway", 9091),
              ("spam-drift", "internet", 443), ("prometheus", "spam-api", 8080), ("prometheus", "mlflow", 5000),
              ("prometheus", "pushgateway", 9091), ("prometheus", "spam-train-head", 8080),
              ("prometheus", "minio", 9000),
              ("grafana", "prometheus", 9090), ("minio-bucket-init", "minio", 9000), ("spam-api", "dns", 53),
              ("spam-backup", "postgres", 5432), ("spam-backup", "minio", 9000),
              ("spam-backup", "internet", 443),  # the backup store is off-site (Secret spam-mlops-backup-dest)
              ("mlflow-auth-bootstrap", "mlflow", 5000),
              ("spam-lake-maintenance", "minio", 9000), ("spam-lake-maintenance", "mlflow", 5000),
              # the data pipeline's Ray cluster: submitted to by the pipeline Jobs, its own pods, the lake, metrics
              ("spam-pipeline", "spam-pipeline-ray-head", 8265), ("spam-pipeline-ray", "spam-pipeline-ray-head", 6379),
              ("spam-pipeline-ray-head", "spam-pipeline-ray", 10002), ("spam-pipeline-ray-head", "minio", 9000),
              ("spam-pipeline-ray", "minio", 9000), ("prometheus", "spam-pipeline-ray-head", 8080),
              ("spam-pipeline-ray-head", "internet", 6443)]  # the autoscaler -> the API server
    refused = [("spam-api", "postgres", 5432), ("spam-api", "redis", 6379), ("spam-api", "internet", 443),
               ("grafana", "mlflow", 5000), ("grafana", "minio", 9000), ("spam-pipeline", "postgres", 5432),
               ("spam-drift", "redis", 6379), ("mlflow", "redis", 6379), ("ingress", "mlflow", 5000),
               ("ingress", "grafana", 3000), ("spam-api", "spam-train-head", 8265), ("minio", "internet", 443),
               ("spam-train-head", "postgres", 5432), ("redis", "minio", 9000), ("spam-api", "prometheus", 9090),
               ("spam-backup", "redis", 6379), ("spam-backup", "mlflow", 5000),
               ("mlflow-auth-bootstrap", "postgres", 5432), ("mlflow-auth-bootstrap", "internet", 443),
               # the data Ray cluster is reached by the pipeline Jobs alone, and reaches only the lake
               ("spam-api", "spam-pipeline-ray-head", 8265), ("spam-train", "spam-pipeline-ray-head", 8265),
               ("spam-pipeline-ray-head", "spam-train-head", 6379), ("spam-drift", "spam-pipeline-ray-head", 8265),
               ("spam-pipeline-ray-head", "redis", 6379), ("spam-pipeline-ray-head", "mlflow", 5000),
               ("spam-pipeline-ray", "postgres", 5432), ("spam-pipeline", "spam-pipeline-ray", 10002)]
    assert [f for f in needed if not flow(*f)] == []
    assert [f for f in refused if flow(*f)] == []


def test_audit_log_reaches_the_pod_log(rendered):
    """The API's replicas write audit lines to /proc/1/fd/1, the stdout of the container's first process: shown here
    with bash as that process and a Python child whose own stdout goes nowhere."""
    api = objects(rendered["prod"], "Deployment")["spam-api"]["spec"]["template"]["spec"]["containers"][0]
    from spam_mlops.config import ServeSettings, env_name
    path = {e["name"]: e.get("value") for e in api["env"]}[env_name(ServeSettings, "audit_log")]
    assert path == "/proc/1/fd/1"
    child = ("import sys, time; from spam_mlops.predlog import AuditLog; a = AuditLog(path=sys.argv[1]); "
             "a.record(time.time(), 'req-1', 'POST', '/api/predict', 200, 0.004, '3', b'secret-key'); a.close()")
    out = subprocess.run(["bash", "-c", f'"{sys.executable}" -c "{child}" "/proc/$$/fd/1" >/dev/null; echo exit=$?'],
                         capture_output=True, text=True, timeout=120)
    first, last = out.stdout.splitlines()[0], out.stdout.splitlines()[-1]
    assert last == "exit=0", out.stderr
    line = json.loads(first)
    assert line["request_id"] == "req-1" and line["status"] == 200 and line["model_version"] == "3"
    assert "secret-key" not in out.stdout and len(line["key_id"]) == 12
