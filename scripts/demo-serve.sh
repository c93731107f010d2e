#!/usr/bin/env bash
# The serving part of `make demo`: start the API on the registered champion (with a demo API key: feedback is
# never accepted without one), send the roadmap's call and a couple more, score a batch of a new campaign and post
# its labels to /api/feedback with curl, show the metrics endpoint, stop the server with SIGTERM (the prediction
# and feedback logs are flushed).
set -euo pipefail
BIN="${BIN:-.venv/bin}"
PORT="${PORT:-8000}"
METRICS_PORT="${METRICS_PORT:-8080}"
LOG="${SERVE_LOG:-serve.log}"
KEY="${DEMO_API_KEY:-demo-key-0123456789}"  # pragma: allowlist secret (a demo key on localhost)
export SPAM_MLOPS_SERVE_API_KEYS="demo:$KEY"
post() { curl -s -X POST "http://localhost:$PORT$1" -H "Content-Type: application/json" -H "X-API-Key: $KEY" -d "$2"; }

"$BIN/spam-mlops" serve --port "$PORT" --metrics-port "$METRICS_PORT" >"$LOG" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 240); do
    curl -sf "http://localhost:$PORT/readyz" >/dev/null 2>&1 && break
    kill -0 $pid 2>/dev/null || { echo "serve exited early; see $LOG" >&2; tail -5 "$LOG" >&2; exit 1; }
    sleep 1
done
curl -sf "http://localhost:$PORT/readyz" >/dev/null || { echo "API not ready after 240 s; see $LOG" >&2; exit 1; }
echo "== the roadmap's call"
post /api/predict '{"text": "Click here for FREE money!"}'; echo
post /api/predict '{"text": "WINNER!! You have won a £900 prize. Call 09061701461 to claim now"}'; echo
post /api/predict/batch '{"texts": ["Ok lar... Joking wif u oni...", "Are we still on for dinner tonight?"]}'; echo
echo "== a new campaign scored, then labelled through POST /api/feedback (one prediction_id per answer)"
"$BIN/python" -c 'import json; from spam_mlops.demo import campaign
rows = [l.split("\t") for l in campaign(200, seed=2).decode().splitlines()]
json.dump({"texts": [t for _, t in rows]}, open("demo-campaign.json", "w"))
json.dump([lab for lab, _ in rows], open("demo-labels.json", "w"))'
post /api/predict/batch @demo-campaign.json > demo-answers.json
"$BIN/python" -c 'import json; a = json.load(open("demo-answers.json"))["predictions"]
labels = json.load(open("demo-labels.json"))
wrong = sum(p["prediction"] != l for p, l in zip(a, labels))
print(f"{len(a)} campaign messages scored by the champion, {wrong} wrong")
json.dump({"items": [{"prediction_id": p["prediction_id"], "label": l} for p, l in zip(a, labels)]},
          open("demo-feedback.json", "w"))'
post /api/feedback @demo-feedback.json; echo
rm -f demo-campaign.json demo-labels.json demo-answers.json demo-feedback.json
echo "== metrics (Ray's endpoint, port $METRICS_PORT)"
for _ in $(seq 30); do  # Ray's metrics agent exports every few seconds
    out=$(curl -s "http://localhost:$METRICS_PORT/metrics" | grep -E '^ray_spam_api_(requests_total|predictions_total)' || true)
    [[ -n "$out" ]] && break
    sleep 1
done
echo "${out:-no spam_api series yet}" | head -6
