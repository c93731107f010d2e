#!/usr/bin/env python3
"""Offline validation of the Kubernetes manifests: render each overlay with `kubectl kustomize`, validate
every built-in object against the Kubernetes OpenAPI schemas in strict mode (kubernetes-validate), check
each custom resource for the fields its controller requires, and check every workload's hardening
(probes, requests/limits, non-root securityContext).

Usage: validate_manifests.py [OVERLAY ...]   (default: every folder under k8s/overlays)
Run it with the tools venv's Python (scripts/install-tools.sh): kubernetes-validate lives there.
Used by `scripts/deploy.sh --dry-run` and by tests/test_manifests.py (which imports the pure checks).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = ROOT / "k8s" / "overlays"
NAMESPACE = "spam-mlops"
# Kubernetes versions the built-in objects must validate against: the oldest we support
# (ValidatingAdmissionPolicy admissionregistration.k8s.io/v1 is GA from 1.30; CronJob timeZone, PodDisruptionBudget
# policy/v1, HPA autoscaling/v2 before) and the newest schema.
K8S_VERSIONS = ("1.30.0", "1.37.0")
CUSTOM_KINDS = {"RayJob", "RayCluster", "RayService", "Rollout", "AnalysisTemplate", "Application", "ClusterPolicy"}
# objects without a namespace (the namespace check skips them)
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy",
                  "ValidatingAdmissionPolicyBinding", "ClusterPolicy"}
APPS = ROOT / "k8s" / "apps"  # what each Argo CD Application renders (k8s/apps/all, sliced by spam-mlops/argocd-app)
APP_LABEL = "spam-mlops/argocd-app"
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "RayJob", "RayCluster"}
LONG_RUNNING = {"Deployment", "StatefulSet", "DaemonSet"}


def tools_bin() -> Path:
    "The tools venv's bin folder (SPAM_MLOPS_TOOLS_VENV or .venv-tools beside the repo's files)."
    return Path(os.environ.get("SPAM_MLOPS_TOOLS_VENV", ROOT / ".venv-tools")) / "bin"


def find_tool(name: str) -> str | None:
    "Path of a tool: $NAME_BIN (e.g. KUBECTL), the tools venv, then PATH."
    env = os.environ.get(name.upper().replace("-", "_"))
    if env and Path(env).is_file(): return env
    cand = tools_bin() / name
    if cand.is_file(): return str(cand)
    return shutil.which(name)


def render(overlay: str | Path, kubectl: str | None = None) -> list[dict]:
    "Objects of `kubectl kustomize` on an overlay folder (a name under k8s/overlays, or a path)."
    kubectl = kubectl or find_tool("kubectl")
    if not kubectl: raise RuntimeError("kubectl not found: run scripts/install-tools.sh")
    path = Path(overlay) if Path(overlay).is_dir() else OVERLAYS / str(overlay)
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True)
    if out.returncode: raise RuntimeError(f"kubectl kustomize {path} failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def name_of(doc: dict) -> str:
    "kind/name of an object, for messages."
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def _get(d, *path):
    for p in path:
        if isinstance(p, int):
            if not isinstance(d, list) or len(d) <= p: return None
        elif not isinstance(d, dict) or p not in d: return None
        d = d[p]
    return d


# ---- built-in objects --------------------------------------------------------------------------------
def validate_builtin(docs: list[dict], versions=K8S_VERSIONS) -> tuple[list[str], list[str]]:
    "Strict schema validation of built-in objects: (problems, kinds without a schema, i.e. custom)."
    import kubernetes_validate as kv
    problems, custom = [], []
    for d in docs:
        for v in versions:
            try: kv.validate(d, v, strict=True)
            except kv.SchemaNotFoundError:
                custom.append(name_of(d))
                break
            except kv.ValidationError as e:
                where = "/".join(str(p) for p in e.path)
                problems.append(f"{name_of(d)} (k8s {v}) at {where or '/'}: {e.message}")
    return problems, sorted(set(custom))


# ---- custom resources: the fields their controllers require --------------------------------------------
def _check_pod_template(tpl, where: str) -> list[str]:
    c = _get(tpl, "spec", "containers")
    if not c: return [f"{where}: template.spec.containers is empty"]
    return [f"{where}: container {i} has no image" for i, x in enumerate(c) if not x.get("image")]


def check_rayjob(d: dict) -> list[str]:
    "KubeRay (ray.io/v1) RayJob: entrypoint, a head group with a pod template, named worker groups."
    p, s = [], d.get("spec") or {}
    if d.get("apiVersion") != "ray.io/v1": p.append(f"apiVersion {d.get('apiVersion')} is not ray.io/v1")
    if not s.get("entrypoint"): p.append("spec.entrypoint is missing")
    rc = s.get("rayClusterSpec")
    if not rc and not s.get("clusterSelector"): p.append("spec.rayClusterSpec (or clusterSelector) is missing")
    if s.get("suspend") and not s.get("shutdownAfterJobFinishes"):
        p.append("a suspended RayJob needs spec.shutdownAfterJobFinishes: true (KubeRay validation)")
    if s.get("submissionMode", "K8sJobMode") not in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"):
        p.append(f"unknown spec.submissionMode {s.get('submissionMode')}")
    if rc: p += _check_ray_cluster(rc, http_mode=s.get("submissionMode") == "HTTPMode", where="spec.rayClusterSpec.")
    return p


def _check_ray_cluster(rc: dict, http_mode: bool = False, where: str = "spec.") -> list[str]:
    "A KubeRay cluster spec (a RayCluster's spec, a RayJob's rayClusterSpec): head, named worker groups, autoscaler."
    p = []
    head = rc.get("headGroupSpec")
    if not head: p.append(f"{where}headGroupSpec is missing")
    else:
        if not isinstance(head.get("rayStartParams", {}), dict): p.append("headGroupSpec.rayStartParams must be a map")
        p += _check_pod_template(head.get("template"), "headGroupSpec.template")
        ports = {x.get("name") for c in _get(head, "template", "spec", "containers") or [] for x in c.get("ports", [])}
        if http_mode and "dashboard" not in ports:
            p.append("HTTPMode submits through the head's port named 'dashboard' (8265), which is missing")
    for i, w in enumerate(rc.get("workerGroupSpecs") or []):
        if not w.get("groupName"): p.append(f"workerGroupSpecs[{i}].groupName is missing")
        p += _check_pod_template(w.get("template"), f"workerGroupSpecs[{i}].template")
        lo, n, hi = w.get("minReplicas", 0), w.get("replicas", 0), w.get("maxReplicas", 2**31)
        if not lo <= n <= hi: p.append(f"workerGroupSpecs[{i}]: replicas {n} not within [{lo}, {hi}]")
    if not rc.get("rayVersion"): p.append(f"{where}rayVersion is missing")
    if rc.get("enableInTreeAutoscaling"):
        # the operator adds the autoscaler container to the head pod from autoscalerOptions: it is hardened there
        opts, n = rc.get("autoscalerOptions") or {}, "autoscalerOptions"
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if not _get(opts, "resources", kind, r): p.append(f"{n}.resources.{kind}.{r} missing")
        sc = opts.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False: p.append(f"{n}: allowPrivilegeEscalation not false")
        if sc.get("readOnlyRootFilesystem") is not True: p.append(f"{n}: readOnlyRootFilesystem not true")
        if "ALL" not in (_get(sc, "capabilities", "drop") or []): p.append(f"{n}: capabilities.drop lacks ALL")
        if _get(head, "template", "spec", "automountServiceAccountToken") is False:
            p.append("the autoscaler needs the head pod's ServiceAccount token (automountServiceAccountToken false)")
    return p


def check_raycluster(d: dict) -> list[str]:
    "KubeRay (ray.io/v1) RayCluster: its cluster spec, as a RayJob's."
    p = [] if d.get("apiVersion") == "ray.io/v1" else [f"apiVersion {d.get('apiVersion')} is not ray.io/v1"]
    return p + _check_ray_cluster(d.get("spec") or {})


def check_rollout(d: dict) -> list[str]:
    "Argo Rollouts Rollout: a selector, a pod template or workloadRef, a canary strategy with sane steps."
    p, s = [], d.get("spec") or {}
    if d.get("apiVersion") != "argoproj.io/v1alpha1":
        p.append(f"apiVersion {d.get('apiVersion')} is not argoproj.io/v1alpha1")
    if not _get(s, "selector", "matchLabels") and not _get(s, "selector", "matchExpressions"):
        p.append("spec.selector is missing")
    if bool(s.get("template")) == bool(s.get("workloadRef")):
        p.append("exactly one of spec.template / spec.workloadRef is required")
    ref = s.get("workloadRef") or {}
    if s.get("workloadRef") and not (ref.get("apiVersion") and ref.get("kind") and ref.get("name")):
        p.append("spec.workloadRef needs apiVersion, kind and name")
    c = _get(s, "strategy", "canary")
    if not c and not _get(s, "strategy", "blueGreen"): p.append("spec.strategy.canary (or blueGreen) is missing")
    if c:
        weights = [st["setWeight"] for st in c.get("steps") or [] if "setWeight" in st]
        if any(not 0 <= w <= 100 for w in weights): p.append(f"setWeight out of 0..100: {weights}")
        if weights != sorted(weights): p.append(f"canary weights must increase: {weights}")
        if c.get("trafficRouting") and not (c.get("canaryService") and c.get("stableService")):
            p.append("trafficRouting needs canaryService and stableService")
        if c.get("canaryService") and c.get("canaryService") == c.get("stableService"):
            p.append("canaryService and stableService must differ")
        for a in (_get(c, "analysis", "templates") or []):
            if not a.get("templateName") and not a.get("clusterTemplateName"):
                p.append("analysis template without a name")
    return p


def check_analysis_template(d: dict) -> list[str]:
    "Argo Rollouts AnalysisTemplate: named metrics with a provider; every {{args.x}} is declared."
    import re
    p, s = [], d.get("spec") or {}
    metrics = s.get("metrics") or []
    if not metrics: p.append("spec.metrics is empty")
    declared = {a.get("name") for a in s.get("args") or []}
    for m in metrics:
        if not m.get("name"): p.append("a metric has no name")
        prov = m.get("provider") or {}
        if len(prov) != 1: p.append(f"metric {m.get('name')}: exactly one provider is required")
        prom = prov.get("prometheus")
        if prom is not None and not (prom.get("address") and prom.get("query")):
            p.append(f"metric {m.get('name')}: prometheus provider needs address and query")
        if not m.get("successCondition") and not m.get("failureCondition"):
            p.append(f"metric {m.get('name')}: needs a successCondition or failureCondition")
        used = set(re.findall(r"\{\{\s*args\.([\w-]+)\s*\}\}", yaml.safe_dump(m)))
        if used - declared: p.append(f"metric {m.get('name')}: undeclared args {sorted(used - declared)}")
    return p


def check_application(d: dict) -> list[str]:
    "Argo CD Application: project, a source with repoURL/path, a destination."
    p, s = [], d.get("spec") or {}
    if d.get("apiVersion") != "argoproj.io/v1alpha1":
        p.append(f"apiVersion {d.get('apiVersion')} is not argoproj.io/v1alpha1")
    if not s.get("project"): p.append("spec.project is missing")
    src = s.get("source") or {}
    if not src.get("repoURL"): p.append("spec.source.repoURL is missing")
    if not (src.get("path") or src.get("chart")): p.append("spec.source.path (or chart) is missing")
    dst = s.get("destination") or {}
    if not (dst.get("server") or dst.get("name")): p.append("spec.destination.server (or name) is missing")
    return p


def check_cluster_policy(d: dict) -> list[str]:
    "Kyverno ClusterPolicy: kyverno.io/v1, rules with a name and a match; verifyImages rules name images and attestors."
    p, s = [], d.get("spec") or {}
    if d.get("apiVersion") != "kyverno.io/v1": p.append(f"apiVersion {d.get('apiVersion')} is not kyverno.io/v1")
    rules = s.get("rules") or []
    if not rules: p.append("spec.rules is empty")
    for r in rules:
        if not r.get("name"): p.append("a rule has no name")
        if not r.get("match"): p.append(f"rule {r.get('name')}: match is missing")
        for v in r.get("verifyImages") or []:
            if not (v.get("imageReferences") and v.get("attestors")):
                p.append(f"rule {r.get('name')}: verifyImages needs imageReferences and attestors")
    return p


CUSTOM_CHECKS = {"RayJob": check_rayjob, "RayCluster": check_raycluster, "Rollout": check_rollout,
                 "AnalysisTemplate": check_analysis_template, "Application": check_application,
                 "ClusterPolicy": check_cluster_policy}


def check_custom(d: dict) -> list[str]:
    "Problems of one custom resource, prefixed with its kind/name (unknown kinds are a problem too)."
    fn = CUSTOM_CHECKS.get(d.get("kind"))
    if fn is None: return [f"{name_of(d)}: no check for this custom kind"]
    return [f"{name_of(d)}: {x}" for x in fn(d)]


# ---- workload hardening ----------------------------------------------------------------------------------
def pod_specs(d: dict) -> list[tuple[str, dict]]:
    "(where, pod spec) of every pod template in an object."
    k, s = d.get("kind"), d.get("spec") or {}
    if k in ("Deployment", "StatefulSet", "DaemonSet", "Job"): return [("template", _get(s, "template", "spec") or {})]
    if k == "CronJob": return [("jobTemplate", _get(s, "jobTemplate", "spec", "template", "spec") or {})]
    if k in ("RayJob", "RayCluster"):
        rc = (s.get("rayClusterSpec") or {}) if k == "RayJob" else s
        out = [("head", _get(rc, "headGroupSpec", "template", "spec") or {})]
        out += [(f"worker {w.get('groupName')}", _get(w, "template", "spec") or {})
                for w in rc.get("workerGroupSpecs") or []]
        return out
    return []


def check_hardening(d: dict) -> list[str]:
    "Every container: requests and limits (cpu, memory), non-root, no privilege escalation, read-only root, "
    "all capabilities dropped, RuntimeDefault seccomp; long-running pods (and Ray pods): readiness and liveness probes."
    p = []
    for where, spec in pod_specs(d):
        psc = spec.get("securityContext") or {}
        if _get(psc, "seccompProfile", "type") != "RuntimeDefault":
            p.append(f"{where}: pod seccompProfile is not RuntimeDefault")
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            n, csc = f"{where}/{c.get('name')}", c.get("securityContext") or {}
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if not _get(c, "resources", kind, r): p.append(f"{n}: resources.{kind}.{r} missing")
            if not (csc.get("runAsNonRoot") or psc.get("runAsNonRoot")): p.append(f"{n}: runAsNonRoot not set")
            if (csc.get("runAsUser", psc.get("runAsUser")) or 0) == 0: p.append(f"{n}: runAsUser is root or unset")
            if csc.get("allowPrivilegeEscalation") is not False: p.append(f"{n}: allowPrivilegeEscalation not false")
            if csc.get("readOnlyRootFilesystem") is not True: p.append(f"{n}: readOnlyRootFilesystem not true")
            if "ALL" not in (_get(csc, "capabilities", "drop") or []): p.append(f"{n}: capabilities.drop lacks ALL")
            is_init = c in (spec.get("initContainers") or [])
            if (d.get("kind") in LONG_RUNNING or d.get("kind") in ("RayJob", "RayCluster")) and not is_init:
                for probe in ("readinessProbe", "livenessProbe"):
                    if not c.get(probe): p.append(f"{n}: {probe} missing")
    return [f"{name_of(d)}: {x}" for x in p]


def check_overlay(docs: list[dict], namespace: str = NAMESPACE) -> list[str]:
    "Problems of a rendered overlay besides schemas: custom resources, hardening, namespace, no Secrets."
    p = []
    for d in docs:
        if d.get("kind") in CUSTOM_KINDS: p += check_custom(d)
        p += check_hardening(d)
        if d.get("kind") == "Secret":
            p.append(f"{name_of(d)}: Secrets are never committed (create them, see the runbook)")
        if d.get("kind") not in CLUSTER_SCOPED and _get(d, "metadata", "namespace") != namespace:
            p.append(f"{name_of(d)}: namespace is {_get(d, 'metadata', 'namespace')!r}, not {namespace!r}")
    return p


# ---- GitOps: the Argo CD Applications and their slices --------------------------------------------------
def argocd_applications(kubectl: str | None = None) -> list[dict]:
    "The root Application (argocd/spam-mlops.yaml) and the Applications it deploys (argocd/apps, rendered)."
    root = yaml.safe_load((ROOT / "argocd" / "spam-mlops.yaml").read_text())
    return [root, *render(ROOT / "argocd" / "apps", kubectl)]


def app_slices(kubectl: str | None = None) -> dict[str, list[dict]]:
    "What each Application deploys (k8s/apps/<app>), and under 'all' the labelled whole (k8s/apps/all)."
    return {x.name: render(x, kubectl) for x in sorted(APPS.iterdir()) if (x / "kustomization.yaml").is_file()}


def _key(d: dict) -> tuple:
    return d.get("kind"), _get(d, "metadata", "namespace"), _get(d, "metadata", "name")


def check_partition(slices: dict[str, list[dict]], apps: list[dict]) -> list[str]:
    "Each object of k8s/apps/all is in exactly one slice, the one its label names; each slice is one Application's."
    p, whole = [], slices.get("all") or []
    if not whole: return ["k8s/apps/all renders nothing"]
    paths = {_get(a, "spec", "source", "path"): _get(a, "metadata", "name") for a in apps}
    owners: dict[tuple, list[str]] = {}
    for name, docs in slices.items():
        if name == "all": continue
        if f"k8s/apps/{name}" not in paths: p.append(f"k8s/apps/{name}: no Application deploys it")
        for d in docs:
            owners.setdefault(_key(d), []).append(name)
            if _get(d, "metadata", "labels", APP_LABEL) != name:
                p.append(f"{name_of(d)} in slice {name} is labelled {_get(d, 'metadata', 'labels', APP_LABEL)}")
    for d in whole:
        got = owners.get(_key(d), [])
        if len(got) != 1: p.append(f"{name_of(d)}: in {len(got)} Applications' slices {got}, not exactly one")
    if len(owners) != len({_key(d) for d in whole}): p.append("a slice holds an object k8s/apps/all does not")
    return p


def main(argv: list[str]) -> int:
    overlays = argv or sorted(x.name for x in OVERLAYS.iterdir() if (x / "kustomization.yaml").is_file())
    failed = False
    for o in overlays:
        docs = render(o)
        schema, custom = validate_builtin(docs)
        problems = schema + check_overlay(docs)
        print(f"{o}: {len(docs)} objects, {len(docs) - len(custom)} built-in validated strict against "
              f"Kubernetes {', '.join(K8S_VERSIONS)}, custom resources checked: {', '.join(custom) or 'none'}")
        for x in problems: print(f"  {o}: {x}")
        failed |= bool(problems)
    apps = argocd_applications()
    app_problems = [x for a in apps for x in check_custom(a)]
    slices = app_slices()
    app_problems += check_partition(slices, apps)
    for name, docs in slices.items(): app_problems += [f"k8s/apps/{name}: {x}" for x in check_overlay(docs)]
    for x in app_problems: print(f"  argocd: {x}")
    print(f"argocd: {', '.join(name_of(a) for a in apps)} checked; k8s/apps slices "
          f"{', '.join(f'{n} ({len(d)})' for n, d in slices.items())} partition the prod overlay")
    failed |= bool(app_problems)
    print("FAILED" if failed else "OK: every overlay renders and validates")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
