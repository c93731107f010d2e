#!/usr/bin/env bash
# pipeline-submit.sh NOTEBOOK: run `spam-mlops run NOTEBOOK` as a Ray job on the data pipeline's Ray cluster
# (k8s/base/pipeline-ray.yaml) with the Ray Data engine, follow its logs, exit 0 only if it SUCCEEDED.
# Run by the curate and features init containers of the pipeline CronJobs (jobs.yaml), from the ConfigMap
# spam-pipeline-submit. RAY_ADDRESS is the head's job API (http://spam-pipeline-ray-head-svc:8265), JOB_NAME the
# Kubernetes Job's name: the Ray job's id is <Job>-<notebook>, so a retried pod of the same Job follows the run
# already submitted instead of starting a second one beside it. A stage longer than STAGE_TIMEOUT_S (default
# 45 minutes) is ended on the cluster by `timeout`, not left running after the Job's deadline.
set -euo pipefail
notebook="${1:?usage: pipeline-submit.sh NOTEBOOK (e.g. 01_curate)}"
: "${RAY_ADDRESS:?RAY_ADDRESS must name the job API of the data cluster, e.g. http://spam-pipeline-ray-head-svc:8265}"
: "${JOB_NAME:?JOB_NAME must name the Kubernetes Job (the pod label job-name)}"
id="${JOB_NAME}-${notebook}"
export RAY_ADDRESS

if ray job status "$id" >/dev/null 2>&1; then
    echo "Ray job $id already submitted (a retried pod): following it"
else
    ray job submit --no-wait --submission-id "$id" \
        --runtime-env-json '{"env_vars": {"SPAM_MLOPS_DATA_ENGINE": "ray"}}' \
        -- timeout "${STAGE_TIMEOUT_S:-2700}" spam-mlops run "$notebook"
fi
ray job logs --follow "$id"
python - "$id" <<'PY'
import os, sys
from ray.job_submission import JobSubmissionClient
status = JobSubmissionClient(os.environ["RAY_ADDRESS"]).get_job_status(sys.argv[1])
print(f"Ray job {sys.argv[1]}: {status}")
sys.exit(0 if status == "SUCCEEDED" else 1)
PY
