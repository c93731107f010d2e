"""Power of the domain test's settings (issue 14): logistic-regression C and tail share, on the windows of
`bench/drift_quality.py`'s sensitivity curve (same seeds, same pools), flagged at the domain group's level.

Usage: .venv/bin/python bench/domain_power.py [--seed 0] [--windows 20] [--shares 0,0.1,0.2]

Trains the LSTM of drift_quality (5 epochs, in-process) on SPAM_MLOPS_SOURCE in a private lake and MLflow, then for
each source and share builds the windows once and runs `spam_mlops.domain.classifier_test` with every variant on the
same design matrix. The variant `C=0.1 tail=0.1` is the previous default, measured in the same run as the baseline.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import drift_quality as dq  # noqa: E402
import shifted_corpus  # noqa: E402
from machine import machine  # noqa: E402

VARIANTS = {"C=0.1 tail=0.1": dict(c=0.1, tail=0.1), "C=0.3 tail=0.1": dict(c=0.3, tail=0.1),
            "C=1 tail=0.1": dict(c=1.0, tail=0.1), "C=10 tail=0.1": dict(c=10.0, tail=0.1),
            "C=0.1 tail=0.2": dict(c=0.1, tail=0.2), "C=1 tail=0.2": dict(c=1.0, tail=0.2)}
LEVEL = 0.01 / 4  # DriftSettings.p_value over the 4 groups tested


def design_of(window: pd.DataFrame, profile: dict, model):
    "The domain test's inputs for one window, as `spam_mlops.domain.domain_test` builds them."
    from spam_mlops import domain as dm
    from spam_mlops.curate import clean_text
    from spam_mlops.features import FEATURE_TYPES
    ref_clean, ref_feats = dm._reference(profile)
    clean = clean_text(window.text.fillna("").astype(str).astype(object)).fillna("").astype(str).tolist()
    feats = np.vstack([ref_feats, window[list(FEATURE_TYPES)].astype(float).to_numpy()])
    vocab = set((profile.get("text") or {}).get("vocabulary") or [])
    feats = np.hstack([feats, dm._oov_share(list(ref_clean) + clean, vocab)])
    emb = np.vstack([dm.embed(model, ref_clean, cache=True), dm.embed(model, clean)])
    texts = list(ref_clean) + clean
    y = np.r_[np.zeros(len(ref_clean)), np.ones(len(window))].astype(int)
    return dm.design(texts, feats, emb), y, pd.factorize(pd.Series(texts))[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--shares", default="0,0.1,0.2")
    a = ap.parse_args()
    print(machine())
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from spam_mlops import domain as dm
    from spam_mlops.config import get_settings
    from spam_mlops.curate import curate, read_curated
    from spam_mlops.demo import campaign
    from spam_mlops.drift import resolve_model
    from spam_mlops.features import features
    from spam_mlops.ingest import ingest
    from spam_mlops.lake import Lake
    from spam_mlops.retrain import compute_baseline
    from spam_mlops.retrain import keras_model as load_version
    from spam_mlops.train import split_frame, train, training_frame
    tmp = Path(tempfile.mkdtemp(prefix="domain-power-"))
    s = get_settings(lake=str(tmp / "lake"), mlflow_tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    for stage in (ingest, curate, features): stage(s)
    train(s, config={"epochs": 5}, workers=0, recall_floor=0.0, features_source="lake")
    model = resolve_model(s)
    profile, km = compute_baseline(s, model), load_version(s, model)
    lake = Lake.from_settings(s)
    ids = set(split_frame(training_frame(lake=lake, source="lake"))["test"].message_id)
    cur = read_curated(lake)
    base = dq.scored_log(cur[cur.message_id.isin(ids)].text.tolist(), km, model["version"])
    shifted, _ = shifted_corpus.load()
    camp = [line.split("\t", 1)[1] for line in campaign(3000, seed=a.seed + 7).decode().splitlines()]
    sources = {"SpamAssassin snippets": dq.scored_log(shifted.text.tolist(), km, model["version"]),
               "parcel-fee campaign": dq.scored_log(camp, km, model["version"])}
    rows = []
    for si, (name, pool) in enumerate(sources.items()):
        for share in [float(x) for x in a.shares.split(",")]:
            rng = np.random.default_rng(a.seed + 1000 * si + int(share * 100))  # drift_quality.sensitivity's seeds
            hits = dict.fromkeys(VARIANTS, 0)
            for _ in range(a.windows):
                x, y, groups = design_of(dq.mixed_window(base, pool, share, 500, rng), profile, km)
                for k, v in VARIANTS.items():
                    hits[k] += dm.classifier_test(x, y, groups, seed=0, **v)["p_value"] < LEVEL
            rows.append({"source": name, "share": f"{share:.0%}", **hits})
            print(rows[-1], flush=True)
    print(pd.DataFrame(rows).set_index(["source", "share"]).to_string())


if __name__ == "__main__":
    main()
