"""GitOps that neither gates deploys nor deletes data, checked on what Argo CD would render.

The root Application (argocd/spam-mlops.yaml) deploys four Applications (argocd/apps), each syncing one slice of
the prod overlay (k8s/apps/<app>, cut out of k8s/apps/all by the label spam-mlops/argocd-app). Everything here is
rendered with `kubectl kustomize`, exactly as Argo CD's repo server renders a kustomize path; no cluster is needed,
and none of Argo CD's runtime behaviour (hook execution, the deletion itself) is exercised.
"""
from __future__ import annotations

import json
import shutil
import sys

import pytest
import yaml
from support import ROOT, require

sys.path.insert(0, str(ROOT / "scripts"))
import validate_manifests as vm  # noqa: E402

HOOK = "argocd.argoproj.io/hook"
SYNC_OPTIONS = "argocd.argoproj.io/sync-options"
FINALIZER = "resources-finalizer.argocd.argoproj.io"
DATA_KINDS = {"Namespace", "StatefulSet", "PersistentVolumeClaim"}


def kubectl() -> str:
    return require(vm.find_tool("kubectl"), "kubectl", "run scripts/install-tools.sh")


@pytest.fixture(scope="module")
def slices() -> dict[str, list[dict]]:
    return vm.app_slices(kubectl())


@pytest.fixture(scope="module")
def apps() -> dict[str, dict]:
    return {a["metadata"]["name"]: a for a in vm.argocd_applications(kubectl())}


def names(docs, kind=None) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in docs if kind in (None, d["kind"])}


def options(d: dict) -> set[str]:
    return {x.strip() for x in (d["metadata"].get("annotations") or {}).get(SYNC_OPTIONS, "").split(",") if x.strip()}


def test_the_applications_partition_the_prod_overlay(slices, apps):
    "Each object of the prod overlay is deployed by exactly one Application, and each slice is some Application's."
    assert set(slices) == {"all", "stores", "monitoring", "pipeline", "serving"}
    assert vm.check_partition(slices, list(apps.values())) == []
    prod = vm.render("prod", kubectl())
    assert names(prod) == names(slices["all"]) == set().union(*(names(v) for k, v in slices.items() if k != "all"))
    # the slices are what the issue names
    assert {("StatefulSet", "minio"), ("StatefulSet", "postgres"), ("Deployment", "redis"), ("Deployment", "mlflow"),
            ("Namespace", "spam-mlops")} <= names(slices["stores"])
    assert {("CronJob", "data-pipeline"), ("CronJob", "data-pipeline-bootstrap")} <= names(slices["pipeline"])
    assert {("Rollout", "spam-api"), ("Deployment", "spam-api"), ("AnalysisTemplate", "spam-api-canary"),
            ("Service", "spam-api-canary"), ("Ingress", "spam-api")} <= names(slices["serving"])
    assert {k for k, _ in names(slices["serving"])} <= {"Deployment", "Rollout", "AnalysisTemplate", "Service",
                                                         "Ingress", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                                                         "NetworkPolicy"}


def test_partition_check_can_fail(slices, apps):
    "An object in two slices, an object in none, and a slice no Application deploys are each reported."
    api = next(d for d in slices["serving"] if d["kind"] == "Rollout")
    twice = {**slices, "pipeline": [*slices["pipeline"], api]}
    assert any("Rollout/spam-api: in 2" in p for p in vm.check_partition(twice, list(apps.values())))
    none = {**slices, "serving": [d for d in slices["serving"] if d["kind"] != "Rollout"]}
    assert any("Rollout/spam-api: in 0" in p for p in vm.check_partition(none, list(apps.values())))
    orphan = [a for a in apps.values() if a["metadata"]["name"] != "spam-mlops-serving"]
    assert "k8s/apps/serving: no Application deploys it" in vm.check_partition(slices, orphan)


def test_no_sync_hook_outside_the_stores_and_none_in_serving(slices):
    """A sync of serving (every image bump) or of the pipeline runs nothing: no hook there. Hooks live only in the
    stores' slice (the bucket-init Job: idempotent, offline, no download)."""
    hooks = {app: names([d for d in docs if HOOK in (d["metadata"].get("annotations") or {})])
             for app, docs in slices.items() if app != "all"}
    assert ("Job", "minio-bucket-init") in hooks.pop("stores")
    assert hooks == {"monitoring": set(), "pipeline": set(), "serving": set()}
    init = next(d for d in slices["stores"] if d["metadata"]["name"] == "minio-bucket-init")
    image = init["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.startswith("quay.io/minio/mc:") and "spam-mlops" not in image
    # and no Job at all in serving or pipeline: a Job there would run on its first sync (and be immutable after)
    assert not names(slices["serving"], "Job") and not names(slices["pipeline"], "Job")
    assert not names(slices["serving"], "CronJob")


def test_the_pipeline_runs_from_its_cronjobs(slices):
    "Daily CronJob (the landing prefix) and a suspended first-run template, both with the four stages in order."
    cron = {d["metadata"]["name"]: d for d in slices["pipeline"] if d["kind"] == "CronJob"}
    daily, boot = cron["data-pipeline"]["spec"], cron["data-pipeline-bootstrap"]["spec"]
    assert not daily.get("suspend") and len(daily["schedule"].split()) == 5 and daily["concurrencyPolicy"] == "Forbid"
    assert boot["suspend"] is True and boot["concurrencyPolicy"] == "Forbid"
    for spec in (daily, boot):
        pod = spec["jobTemplate"]["spec"]["template"]["spec"]
        assert [c["args"][-1] for c in pod["initContainers"] + pod["containers"]] == \
            ["00_ingest", "01_curate", "02_features", "03_feature_store"]
    runbook = (ROOT / "nbs" / "explanations" / "runbook.md").read_text()
    assert "create job pipeline-first-run --from=cronjob/data-pipeline-bootstrap" in runbook
    assert "--from=cronjob/data-pipeline-bootstrap" in (ROOT / "scripts" / "deploy.sh").read_text()


def test_data_holding_objects_survive_deletion_and_pruning(slices):
    "Namespace, StatefulSets and PVCs: Argo CD neither prunes nor deletes them; StatefulSets keep their PVCs."
    data = [d for docs in slices.values() for d in docs if d["kind"] in DATA_KINDS]
    assert {("Namespace", "spam-mlops"), ("StatefulSet", "minio"), ("StatefulSet", "postgres"),
            ("PersistentVolumeClaim", "prometheus-data")} <= names(data)
    assert [vm.name_of(d) for d in data if not {"Prune=false", "Delete=false"} <= options(d)] == []
    for overlay in ("local", "prod"):
        for d in vm.render(overlay, kubectl()):
            if d["kind"] == "StatefulSet":
                assert d["spec"]["persistentVolumeClaimRetentionPolicy"] == \
                    {"whenDeleted": "Retain", "whenScaled": "Retain"}, (overlay, d["metadata"]["name"])
    # the slices whose Applications delete what they deployed hold no data
    assert not [vm.name_of(d) for d in slices["serving"] + slices["pipeline"] if d["kind"] in DATA_KINDS]


def test_finalizers_only_where_no_data_is_held(apps, slices):
    "Deleting the root, the stores or monitoring deletes nothing they deployed; the stores' Application stays."
    fin = {n: FINALIZER in (a["metadata"].get("finalizers") or []) for n, a in apps.items()}
    assert fin == {"spam-mlops": False, "spam-mlops-stores": False, "spam-mlops-monitoring": False,
                   "spam-mlops-pipeline": True, "spam-mlops-serving": True}
    for n in ("spam-mlops-stores", "spam-mlops-monitoring"):
        assert {"Prune=false", "Delete=false"} <= options(apps[n]), n
    # the finalizer's cascade would reach only objects without Delete=false: none of them holds data
    for n in ("pipeline", "serving"):
        assert all("Delete=false" not in options(d) for d in slices[n]) and \
            not any(d["kind"] in DATA_KINDS for d in slices[n])
    waves = {n: int(a["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]) for n, a in apps.items()
             if n != "spam-mlops"}
    assert waves["spam-mlops-stores"] < waves["spam-mlops-pipeline"] < waves["spam-mlops-serving"]


def test_an_image_bump_changes_no_hook_and_starts_no_job(tmp_path):
    """New image digests in the prod overlay (what CI commits) change only pod templates: no hook, no Job, no object
    of the data slices besides workloads' images; the serving slice changes, and a sync of it runs nothing."""
    work = tmp_path / "repo"
    for d in ("k8s", "argocd", "monitoring"): shutil.copytree(ROOT / d, work / d)
    before = {x.name: vm.render(x, kubectl()) for x in sorted((work / "k8s" / "apps").iterdir())}
    kust = work / "k8s" / "overlays" / "prod" / "kustomization.yaml"
    k = yaml.safe_load(kust.read_text())
    for i, img in enumerate(k["images"]):
        img.pop("newTag", None)
        img["digest"] = "sha256:" + str(i + 1) * 64
    kust.write_text(yaml.safe_dump(k))
    after = {x.name: vm.render(x, kubectl()) for x in sorted((work / "k8s" / "apps").iterdir())}
    changed = {}
    for app in before:
        old = {vm.name_of(d): json.dumps(d, sort_keys=True) for d in before[app]}
        new = {vm.name_of(d): json.dumps(d, sort_keys=True) for d in after[app]}
        assert set(old) == set(new), app
        changed[app] = {n for n in old if old[n] != new[n]}
    assert "Deployment/spam-api" in changed["serving"] and "Rollout/spam-api" not in changed["serving"]
    assert {"CronJob/data-pipeline", "CronJob/data-pipeline-bootstrap"} <= changed["pipeline"]
    # what a bump changes in serving and the pipeline: templates of workloads, never a Job or a hook
    for app in ("pipeline", "serving"):
        for d in after[app]:
            if vm.name_of(d) in changed[app]:
                workloads = ("Deployment", "StatefulSet", "CronJob", "RayJob", "RayCluster")
                assert d["kind"] in workloads, (app, vm.name_of(d))
                assert HOOK not in (d["metadata"].get("annotations") or {})
    # the stores' sync (MLflow runs the jobs image) may rerun a stores hook: that sync is not the serving one
    for d in after["stores"] + after["monitoring"]:
        if vm.name_of(d) in changed["stores"] | changed["monitoring"] and d["kind"] == "Job":
            assert HOOK in d["metadata"]["annotations"] and "spam-mlops/argocd-app" in d["metadata"]["labels"]
            assert d["metadata"]["labels"]["spam-mlops/argocd-app"] == "stores", vm.name_of(d)
