#!/usr/bin/env bash
# The serving part of `make demo`: start the API on the registered champion, send the roadmap's call and a
# couple more, show the metrics endpoint, stop the server with SIGTERM (the prediction log is flushed).
set -euo pipefail
BIN="${BIN:-.venv/bin}"
PORT="${PORT:-8000}"
METRICS_PORT="${METRICS_PORT:-8080}"
LOG="${SERVE_LOG:-serve.log}"

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
curl -s -X POST "http://localhost:$PORT/api/predict" -H "Content-Type: application/json" \
     -d '{"text": "Click here for FREE money!"}'; echo
curl -s -X POST "http://localhost:$PORT/api/predict" -H "Content-Type: application/json" \
     -d '{"text": "WINNER!! You have won a £900 prize. Call 09061701461 to claim now"}'; echo
curl -s -X POST "http://localhost:$PORT/api/predict/batch" -H "Content-Type: application/json" \
     -d '{"texts": ["Ok lar... Joking wif u oni...", "Are we still on for dinner tonight?"]}'; echo
echo "== metrics (Ray's endpoint, port $METRICS_PORT)"
for _ in $(seq 30); do  # Ray's metrics agent exports every few seconds
    out=$(curl -s "http://localhost:$METRICS_PORT/metrics" | grep -E '^ray_spam_api_(requests_total|predictions_total)' || true)
    [[ -n "$out" ]] && break
    sleep 1
done
echo "${out:-no spam_api series yet}" | head -6
