#!/usr/bin/env bash
# The continuous-training part of `make demo`: a second batch lands, every stage takes only what is new, the
# model is retrained on the corpus plus the labels posted by demo-serve.sh, and the gate either promotes the
# challenger or refuses it with its reason. Then the tables' histories show the versions behind it all.
set -euo pipefail
BIN="${BIN:-.venv/bin}"
CLI="$BIN/spam-mlops${VERBOSE:+ -v}"
LANDING="${LANDING:-landing}"

echo "== a second batch lands: a parcel-fee smishing campaign the corpus has not seen"
mkdir -p "$LANDING"
"$BIN/python" -c "from spam_mlops.demo import campaign; open('$LANDING/campaign-1.tsv', 'wb').write(campaign(300, seed=1))"
$CLI ingest "$LANDING/"
echo "== the same landing folder again: nothing new"
$CLI ingest "$LANDING/"
$CLI curate
$CLI features
$CLI materialize
echo "== retrain on the corpus plus the labelled feedback; the gate decides"
$CLI train
echo "== the versions behind it"
$CLI lake history raw
$CLI lake history curated
$CLI lake history feedback
