"""Supply chain of the CI/CD workflow (.github/workflows/ci-cd.yaml), checked on the workflow file itself.

Every action is pinned by a full commit SHA with its release tag in a comment; the images are scanned and signed
keyless in the job that builds them; the bump writes their digests (the step's shell runs here on a copy of the
overlay) and pushes with rebase and retry (the step's shell runs here against a real git remote whose main moved).
What only GitHub shows: that the SHAs are the tags' commits (checked against public workflows, see the runbook),
that the OIDC token, Fulcio and Rekor work, and that Trivy finds nothing fixable in the real images.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from support import ROOT, require

sys.path.insert(0, str(ROOT / "scripts"))
import validate_manifests as vm  # noqa: E402

WORKFLOW = ROOT / ".github" / "workflows" / "ci-cd.yaml"
PINNED = re.compile(r"^\s*(?:-\s+)?uses:\s+(?P<action>[\w.-]+/[\w./-]+)@(?P<ref>\S+)(?:\s+#\s*(?P<tag>\S+))?\s*$")


@pytest.fixture(scope="module")
def wf() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def uses_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(r"^\s*(?:-\s+)?uses:", line)]


def unpinned(text: str) -> list[str]:
    "Every `uses:` not pinned to a 40-hex commit SHA with a `# vX.Y.Z` (or X.Y.Z) tag comment; local actions are ok."
    bad = []
    for line in uses_lines(text):
        m = PINNED.match(line)
        if m and m["action"].startswith("./"): continue
        pinned = m and re.fullmatch(r"[0-9a-f]{40}", m["ref"])
        if not (pinned and m["tag"] and re.fullmatch(r"v?\d+\.\d+\.\d+", m["tag"])):
            bad.append(line.strip())
    return bad


def steps(wf, job):
    return wf["jobs"][job]["steps"]


def test_every_action_is_pinned_by_commit_sha(wf):
    text = WORKFLOW.read_text()
    lines = uses_lines(text)
    n_steps = sum("uses" in s for j in wf["jobs"].values() for s in j.get("steps", []))
    assert len(lines) == n_steps >= 10  # the line scan sees every step that uses an action
    assert unpinned(text) == []
    # one SHA per action: the same action is not pinned to two commits
    pins = {}
    for line in lines:
        m = PINNED.match(line)
        pins.setdefault(m["action"], set()).add((m["ref"], m["tag"]))
    assert all(len(v) == 1 for v in pins.values()), pins


def test_the_pin_check_can_fail():
    bad = "\n".join(["    steps:", "      - uses: actions/checkout@v4", "      - uses: a/b@0123456789abcdef",
                     "        uses: docker/login-action@" + "a" * 40, "      - uses: x/y@main # v1.2.3",
                     "      - uses: ok/ok@" + "b" * 40 + " # v1.2.3"])
    assert [x.split("@")[0] for x in unpinned(bad)] == ["- uses: actions/checkout", "- uses: a/b",
                                                        "uses: docker/login-action", "- uses: x/y"]


def test_images_are_scanned_and_signed_keyless_by_digest(wf):
    job = wf["jobs"]["images"]
    assert job["permissions"]["id-token"] == "write" and job["permissions"]["packages"] == "write"
    assert wf.get("permissions") == {"contents": "read"}  # nothing else gets a token that can write
    images = job["strategy"]["matrix"]["image"]
    assert sorted(images) == ["jobs", "serve"]
    s = steps(wf, "images")
    build = next(x for x in s if x.get("uses", "").startswith("docker/build-push-action@"))
    digest = f"${{{{ steps.{build['id']}.outputs.digest }}}}"
    image = "${{ env.IMAGE_PREFIX }}-${{ matrix.image }}@" + digest
    # a scan of each image (the matrix leg's), by digest, failing the job on findings, after the build
    scan = [x for x in s if x.get("uses", "").startswith(("aquasecurity/trivy-action@", "anchore/scan-action@"))]
    assert len(scan) == 1 and scan[0]["with"]["image-ref"] == image and scan[0]["with"]["exit-code"] == "1"
    assert s.index(build) < s.index(scan[0])
    # cosign from its installer, signing and verifying the digest keyless (no key material anywhere)
    inst = next(i for i, x in enumerate(s) if x.get("uses", "").startswith("sigstore/cosign-installer@"))
    sign = next(i for i, x in enumerate(s) if "cosign sign" in x.get("run", ""))
    assert s.index(scan[0]) < inst < sign
    assert s[sign]["env"]["IMAGE"] == image and '"$IMAGE"' in s[sign]["run"]
    assert "--key" not in s[sign]["run"] and "cosign verify" in s[sign]["run"]
    assert "https://token.actions.githubusercontent.com" in s[sign]["run"]
    # the digests leave the job as outputs, one per image, and only those reach the bump
    assert set(job["outputs"]) == {f"digest-{i}" for i in images}
    bump = next(x for x in steps(wf, "bump-prod") if "set-image-digest" in x.get("name", ""))
    assert bump["env"] == {f"DIGEST_{i.upper()}": f"${{{{ needs.images.outputs.digest-{i} }}}}" for i in images}


def _run(cmd, cwd, env=None, check=True):
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=60)
    if check: assert out.returncode == 0, (cmd, out.stdout, out.stderr)
    return out


def test_the_bump_writes_digests_and_refuses_anything_else(wf, tmp_path):
    step = next(x for x in steps(wf, "bump-prod") if "set-image-digest" in x.get("name", ""))
    kubectl = require(vm.find_tool("kubectl"), "kubectl", "run scripts/install-tools.sh")
    for case, digests, ok in [("digests", ("sha256:" + "a" * 64, "sha256:" + "b" * 64), True),
                              ("a tag", ("sha-0123abc", "sha256:" + "b" * 64), False),
                              ("nothing", ("", ""), False)]:
        work = tmp_path / case.replace(" ", "-")
        for d in ("k8s", "argocd", "monitoring"): shutil.copytree(ROOT / d, work / d)
        env = {**os.environ, "DIGEST_JOBS": digests[0], "DIGEST_SERVE": digests[1]}
        out = _run(["bash", "-ec", step["run"]], work, env, check=False)
        assert (out.returncode == 0) == ok, (case, out.stderr)
        if not ok: continue
        kust = yaml.safe_load((work / "k8s" / "overlays" / "prod" / "kustomization.yaml").read_text())
        assert {i["name"]: i.get("digest") for i in kust["images"]} == {
            "ghcr.io/spam-mlops/spam-mlops-jobs": digests[0], "ghcr.io/spam-mlops/spam-mlops-serve": digests[1]}
        assert not any("newTag" in i for i in kust["images"])
        rendered = {c["image"] for d in vm.render(work / "k8s" / "overlays" / "prod", kubectl)
                    for _, spec in vm.pod_specs(d) for c in spec.get("containers", []) if "spam-mlops-" in c["image"]}
        assert rendered == {"ghcr.io/spam-mlops/spam-mlops-jobs@" + digests[0],
                            "ghcr.io/spam-mlops/spam-mlops-serve@" + digests[1]}
        # running it again (a rerun of the job) changes nothing
        before = (work / "k8s" / "overlays" / "prod" / "kustomization.yaml").read_text()
        _run(["bash", "-ec", step["run"]], work, env)
        assert (work / "k8s" / "overlays" / "prod" / "kustomization.yaml").read_text() == before


def test_the_push_rebases_onto_a_main_that_moved(wf, tmp_path):
    """The commit-and-push step, run in a clone of a real (bare) remote after another commit landed on its main:
    it rebases the bump onto that commit and pushes, so main keeps both; with a remote that refuses, it gives up
    after TRIES attempts with an error."""
    step = next(x for x in steps(wf, "bump-prod") if "rebase" in x.get("name", ""))
    git = require(shutil.which("git"), "git", "apt-get install git")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}
    origin, ci, dev = tmp_path / "origin.git", tmp_path / "ci", tmp_path / "dev"
    _run([git, "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path, env)
    _run([git, "clone", "-q", str(origin), str(dev)], tmp_path, env)
    (dev / "k8s").mkdir()
    (dev / "k8s" / "kustomization.yaml").write_text("newTag: old\n")
    (dev / "README").write_text("v1\n")
    _run([git, "add", "."], dev, env), _run([git, "commit", "-qm", "tested commit"], dev, env)
    _run([git, "push", "-q", "origin", "HEAD:main"], dev, env)
    _run([git, "clone", "-q", str(origin), str(ci)], tmp_path, env)  # CI checks out the tested commit
    # main moves during the test job
    (dev / "README").write_text("v2\n")
    _run([git, "commit", "-qam", "merged meanwhile"], dev, env)
    _run([git, "push", "-q", "origin", "HEAD:main"], dev, env)
    # the bump step's edit, then the step under test
    (ci / "k8s" / "kustomization.yaml").write_text("digest: sha256:" + "c" * 64 + "\n")
    run_env = {**env, "SHA": "abc", "TRIES": "3", "BACKOFF_S": "0"}
    _run(["bash", "-ec", step["run"]], ci, run_env)
    log = _run([git, "log", "--format=%s", "main"], origin, env).stdout.split("\n")
    assert log[:3] == ["deploy: prod images of abc by digest [skip ci]", "merged meanwhile", "tested commit"], log
    assert _run([git, "show", "main:README"], origin, env).stdout == "v2\n"
    # a remote that refuses every push: bounded retries, then failure
    hook = origin / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho refused >&2\nexit 1\n"), hook.chmod(0o755)
    (ci / "k8s" / "kustomization.yaml").write_text("digest: sha256:" + "d" * 64 + "\n")
    out = _run(["bash", "-ec", step["run"]], ci, run_env, check=False)
    assert out.returncode == 1 and "after 3 attempts" in out.stderr
    assert out.stderr.count("push attempt") == 3


def test_admission_verifies_the_signature_the_workflow_makes(wf):
    """Prod admits our images only by digest and signed keyless by this workflow on main (Kyverno ClusterPolicy of
    k8s/components/verify-images): the identity it requires is the one the signing step verifies, and its image
    pattern covers both built images; the local overlay (unsigned dev builds) has no such policy."""
    import fnmatch
    kubectl = require(vm.find_tool("kubectl"), "kubectl", "run scripts/install-tools.sh")
    prod, local = vm.render("prod", kubectl), vm.render("local", kubectl)
    (pol,) = [d for d in prod if d["kind"] == "ClusterPolicy"]
    assert not [d for d in local if d["kind"] == "ClusterPolicy"]
    assert vm.check_cluster_policy(pol) == [] and pol["spec"]["validationFailureAction"] == "Enforce"
    (rule,) = pol["spec"]["rules"]
    assert rule["match"]["any"][0]["resources"] == {"kinds": ["Pod"], "namespaces": ["spam-mlops"]}
    (verify,) = rule["verifyImages"]
    assert verify["verifyDigest"] is True and verify["required"] is True
    (keyless,) = [e["keyless"] for a in verify["attestors"] for e in a["entries"]]
    sign = next(x for x in steps(wf, "images") if "cosign sign" in x.get("run", ""))
    assert f"--certificate-oidc-issuer {keyless['issuer']}" in sign["run"]
    # the workflow's identity: <server>/<owner>/<repo>/.github/workflows/ci-cd.yaml@refs/heads/main
    app = next(a for a in vm.argocd_applications(kubectl) if a["metadata"]["name"] == "spam-mlops-serving")
    repo = app["spec"]["source"]["repoURL"].removesuffix(".git")
    assert keyless["subject"] == f"{repo}/{WORKFLOW.relative_to(ROOT).as_posix()}@refs/heads/main"
    assert '"${IDENTITY%@*}@refs/heads/main"' in sign["run"]
    ours = {c["image"] for d in prod for _, spec in vm.pod_specs(d) for c in spec.get("containers", [])
            if "spam-mlops-" in c["image"]}
    assert len(ours) == 2 and all(any(fnmatch.fnmatch(i, p) for p in verify["imageReferences"]) for i in ours)
    third_party = {c["image"] for d in prod for _, spec in vm.pod_specs(d) for c in spec.get("containers", [])} - ours
    assert third_party and not any(fnmatch.fnmatch(i, p) for i in third_party for p in verify["imageReferences"])
