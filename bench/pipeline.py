"""Curate + features throughput on 10k, 100k and 1M messages (the corpus resampled), local lake.

Goal on a 2-core machine: >= 100,000 messages/s at 1M and linear cost (time at 1M <= 11 x time at 100k).
Baseline measured in the same run: a naive per-row `DataFrame.apply` with Python's `re`, same rules.

    .venv/bin/python bench/pipeline.py [--sizes 10000 100000 1000000] [--baseline-max 100000]
"""
from __future__ import annotations

import argparse
import html
import re
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]  # the checkout
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tests"))
from machine import machine  # noqa: E402
from support import corpus_path  # noqa: E402

from spam_mlops.config import get_settings  # noqa: E402
from spam_mlops.curate import _RULES, curate_frame  # noqa: E402
from spam_mlops.features import build_features  # noqa: E402
from spam_mlops.ingest import ingest, message_id, read_raw  # noqa: E402
from spam_mlops.lake import Lake  # noqa: E402

PY_RULES = [(re.compile(p), t) for p, t, _ in _RULES]


def naive_row(row: pd.Series) -> pd.Series:
    "The per-row way: clean and featurise one message at a time."
    t = html.unescape(row.text).lower()
    for pat, tok in PY_RULES: t = pat.sub(tok, t)
    t = t.replace("!", " ! ").replace("?", " ? ")
    t = " ".join(t.split())
    s = row.text
    letters = sum(c.isascii() and c.isalpha() for c in s)
    return pd.Series({"clean_text": t.strip(), "text_length": len(s), "word_count": len(s.split()),
                      "has_url": bool(re.search(r"https?://|www\.", s.lower())), "has_email": "@" in s,
                      "digit_ratio": sum(c.isdigit() for c in s) / max(len(s), 1),
                      "upper_ratio": sum(c.isupper() for c in s) / max(letters, 1), "exclamation_count": s.count("!")})


def _letters(i: int) -> str:
    "A distinct all-letter tag for i (base 26)."
    out = ""
    while True:
        i, r = divmod(i, 26)
        out += chr(97 + r)
        if not i: return out


def resample(raw: pd.DataFrame, n: int) -> pd.DataFrame:
    "n messages drawn from the corpus, each made unique by a suffix so that dedupe keeps all of them."
    df = raw.sample(n, replace=True, random_state=0).reset_index(drop=True)
    df["text"] = df.text + " ref" + pd.Series([_letters(i) for i in df.index])  # letters: keep the digit mix real
    df["message_id"] = [message_id(t) for t in df.text]
    return df


def timed(fn, *a) -> float:
    t0 = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t0


def vectorised(raw: pd.DataFrame, lake: Lake):
    cur, _ = curate_frame(raw)
    feats = build_features(cur, "2026-01-01T00:00:00Z")
    lake.write_parquet("curated/sms_clean.parquet", cur)
    lake.write_parquet("features/nlp_features.parquet", feats)


def naive(raw: pd.DataFrame):
    raw.drop_duplicates(["label", "text"]).apply(naive_row, axis=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--baseline-max", type=int, default=100_000, help="largest size the naive baseline runs at")
    a = ap.parse_args()
    print(machine())
    src = str(corpus_path())  # SPAM_MLOPS_SOURCE when a local file, else ../shared/data beside the checkout
    with tempfile.TemporaryDirectory() as tmp:
        s = get_settings(lake=tmp, source=src)
        ingest(s)
        raw, lake = read_raw(Lake.from_settings(s)), Lake.from_settings(s)
        times = {}
        print(f"{'messages':>10} {'vectorised s':>13} {'msg/s':>10} {'naive s':>9} {'naive msg/s':>12} {'speed-up':>9}")
        for n in a.sizes:
            df = resample(raw, n)
            times[n] = t = timed(vectorised, df, lake)
            b = timed(naive, df) if n <= a.baseline_max else None
            nb = f"{b:9.2f} {n / b:12,.0f} {b / t:8.1f}x" if b else f"{'-':>9} {'-':>12} {'-':>9}"
            print(f"{n:>10,} {t:13.2f} {n / t:10,.0f} {nb}")
        if 100_000 in times and 1_000_000 in times:
            r = times[1_000_000] / times[100_000]
            print(f"time(1M) / time(100k) = {r:.2f} (linear would be 10; goal <= 11)")
            print(f"throughput at 1M: {1_000_000 / times[1_000_000]:,.0f} msg/s (goal >= 100,000)")


if __name__ == "__main__":
    main()
