"""Feast feature store: materialization rows/s into SQLite and Redis; online read latency for 1 and 100 entities.

Goal on this machine: p99 of a single-entity Redis read <= 10 ms (through `spam_mlops.feature_store.online_features`).
Baselines measured in the same run: a raw redis-py pipeline writing the same rows (HSET, 9 fields each) for
materialization, and a raw Redis PING / an SQLite primary-key SELECT for the floor of one read.

    .venv/bin/python bench/feature_store.py [--rows 50000] [--calls 1000] [--redis-url redis://127.0.0.1:6379/12]

The lake is made by the pipeline (ingest, curate, features) from the corpus of tests/support's `corpus_path`
(SPAM_MLOPS_SOURCE when a local file, default ../shared/data) in a temporary folder; its feature rows are repeated
under new message ids up to --rows. The Redis database given is used for the run and the keys written are deleted
at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import redis

ROOT = Path(__file__).resolve().parents[1]  # the checkout
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tests"))
from machine import machine  # noqa: E402
from support import corpus_path  # noqa: E402

from spam_mlops.config import get_settings  # noqa: E402
from spam_mlops.curate import curate  # noqa: E402
from spam_mlops.feature_store import (  # noqa: E402
    FEATURE_SERVICE,
    apply,
    feature_store,
    materialize,
    online_features,
)
from spam_mlops.features import FEATURE_TYPES, FEATURES, features  # noqa: E402
from spam_mlops.ingest import ingest  # noqa: E402
from spam_mlops.lake import Lake  # noqa: E402

GOAL_P99_MS = 10.0


def make_lake(tmp: Path, rows: int) -> tuple[str, pd.DataFrame]:
    "A lake with the pipeline run on the corpus, its features repeated under new ids up to `rows`."
    s = get_settings(lake=str(tmp / "lake"), source=str(corpus_path()))
    ingest(s), curate(s), features(s)
    lake = Lake.from_settings(s)
    f = lake.read_parquet(FEATURES)
    if rows > len(f):
        f = f.sample(rows, replace=True, random_state=0).reset_index(drop=True)
        f["message_id"] = [hashlib.blake2b(f"{m}/{i}".encode(), digest_size=8).hexdigest()
                           for i, m in enumerate(f.message_id)]
        lake.write_parquet(FEATURES, f)
    return s.lake, f


def percentiles(ms: list[float]) -> str:
    a = np.asarray(ms)
    return f"p50 {np.percentile(a, 50):6.2f} ms  p99 {np.percentile(a, 99):6.2f} ms  mean {a.mean():6.2f} ms"


def latencies(fn, calls: int, warmup: int = 50) -> list[float]:
    "Milliseconds of each of `calls` calls of `fn(i)`, after `warmup` calls."
    for i in range(warmup): fn(i)
    out = []
    for i in range(calls):
        t0 = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def read_case(name: str, settings, n: int, batches: list[list[str]], calls: int) -> list[float]:
    "Latencies of `online_features` over `batches` of ids, then of Feast's own call without the DataFrame."
    ms = latencies(lambda i: online_features(settings, batches[i]), calls)
    print(f"{name:7s} {n:3d} entities  online_features      {percentiles(ms)}")
    store = feature_store(settings)
    service = store.get_feature_service(FEATURE_SERVICE, allow_cache=True)
    raw = latencies(lambda i: store.get_online_features(
        features=service, entity_rows=[{"message_id": m} for m in batches[i]]).to_dict(), calls)
    print(f"{name:7s} {n:3d} entities  feast to_dict (raw)  {percentiles(raw)}")
    return ms


def raw_redis_write(url: str, df: pd.DataFrame) -> float:
    "Seconds for a redis-py pipeline to HSET every row (9 fields) in batches of 1000: the write floor."
    r = redis.Redis.from_url(url)
    prefix = "bench:raw:"
    vals = df[list(FEATURE_TYPES)].astype(str).to_dict("records")
    t0 = time.perf_counter()
    for i in range(0, len(df), 1000):
        p = r.pipeline(transaction=False)
        for mid, v in zip(df.message_id.iloc[i:i + 1000], vals[i:i + 1000], strict=True):
            p.hset(prefix + mid, mapping=v)
        p.execute()
    dt = time.perf_counter() - t0
    for i in range(0, len(df), 1000): r.delete(*[prefix + m for m in df.message_id.iloc[i:i + 1000]])
    return dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3, help="materializations per store (best and median reported)")
    ap.add_argument("--redis-url", default=os.environ.get("SPAM_MLOPS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"))
    a = ap.parse_args()
    print(machine("feast", "redis"), "(other work on this machine skews the figures)")
    print(f"redis server {redis.Redis.from_url(a.redis_url).info()['redis_version']}, "
          f"{a.rows} rows, {a.calls} calls per read case")
    tmp = Path(tempfile.mkdtemp(prefix="bench-feast-"))
    shutil.copytree(ROOT / "feature_repo", tmp / "repo", ignore=shutil.ignore_patterns("data", "__pycache__"))
    lake, df = make_lake(tmp, a.rows)
    stores = {name: get_settings(lake=lake, feature_repo=str(tmp / "repo"), online_store=name,
                                 redis_url=a.redis_url)
              for name in ("sqlite", "redis")}
    rng = np.random.default_rng(0)
    ids = df.message_id.to_numpy()
    results = {}
    try:
        print("\n== materialization (full, every row)")
        for name, s in stores.items():
            apply(s)
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                rep = materialize(s, incremental=False)
                times.append(time.perf_counter() - t0)
                assert rep.rows == len(df), rep
            print(f"{name:7s} {len(df) / min(times):9,.0f} rows/s best, "
                  f"{len(df) / statistics.median(times):9,.0f} rows/s median "
                  f"({min(times):.2f} s for {len(df):,} rows)")
        dt = raw_redis_write(a.redis_url, df)
        print(f"baseline: raw redis-py pipeline HSET {len(df) / dt:9,.0f} rows/s ({dt:.2f} s)")

        print(f"\n== online reads, {a.calls} calls each (random message ids)")
        one = rng.choice(ids, a.calls + 50)
        hundred = [rng.choice(ids, 100).tolist() for _ in range(a.calls + 50)]
        for name, s in stores.items():
            for n, batches in ((1, [[m] for m in one]), (100, hundred)):
                results[(name, n)] = read_case(name, s, n, batches, a.calls)
        r = redis.Redis.from_url(a.redis_url)
        print(f"baseline redis  PING                        {percentiles(latencies(lambda i: r.ping(), a.calls))}")
        cfg = feature_store(stores["sqlite"]).config
        db = sqlite3.connect(Path(cfg.repo_path) / cfg.online_store.path)
        table = next(t for (t,) in db.execute("select name from sqlite_master where type='table'")
                     if "message_features" in t)
        keys = [k for (k,) in db.execute(f"select entity_key from {table} limit 1000")]
        select = f"select * from {table} where entity_key=?"
        sqlite_ms = latencies(lambda i: db.execute(select, (keys[i % len(keys)],)).fetchall(), a.calls)
        print(f"baseline sqlite SELECT by entity key        {percentiles(sqlite_ms)}")
    finally:
        for s in stores.values():
            try: feature_store(s).teardown()
            except Exception as e: print(f"teardown {s.online_store}: {e}")
        shutil.rmtree(tmp, ignore_errors=True)

    p99 = float(np.percentile(results[("redis", 1)], 99))
    verdict = "MET" if p99 <= GOAL_P99_MS else "NOT MET"
    print(f"\ngoal: p99 single-entity Redis read <= {GOAL_P99_MS} ms: {p99:.2f} ms -> {verdict}")


if __name__ == "__main__":
    main()
