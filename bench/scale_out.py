"""Curate + features at scale: the local engine, Ray Data on one node, Ray Data on two local nodes (issue 15).

For each size (the corpus resampled as in bench/pipeline.py, written as one raw Delta table) and each engine, a fresh
process runs `spam-mlops curate` then `spam-mlops features` on a lake of its own. The Ray engines join a standing
local cluster (`cluster.LocalCluster`, one node with 2 CPUs or two nodes with 1 CPU each, `--object-store-mb` each),
as the pipeline's CLI joins the standing KubeRay RayCluster in production: the cluster's own start-up is printed, not
counted. Printed per run: messages/s (curate + features), the time ratio of the largest size to the smallest, and
the peak memory summed over every process of the run (the CLI process, its children and every Ray node's
processes), sampled every 0.5 s, twice: as PSS (each shared page, such as the object store's, split between the
processes that map it: the sum is the memory really used) and as RSS (a shared page counted once per process). The
baseline is the local engine, measured in the same run.

Goals: Ray Data's peak memory (PSS) at 10M <= 1.5 x its peak at 1M, time(10M)/time(1M) <= 11, and on one node
>= 0.7 x the local engine's throughput.

    .venv/bin/python bench/scale_out.py [--sizes 1000000 10000000] [--engines local ray-1 ray-2] [--keep DIR]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]  # the checkout
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tests"))
from machine import machine  # noqa: E402
from pipeline import _letters  # noqa: E402
from support import corpus_path  # noqa: E402

from spam_mlops import cluster  # noqa: E402
from spam_mlops.config import child_env, get_settings  # noqa: E402
from spam_mlops.ingest import RAW_TABLE, message_id, parse_lines  # noqa: E402
from spam_mlops.lake import Lake  # noqa: E402
from spam_mlops.tables import Table  # noqa: E402

CHUNK = 1_000_000  # rows per append while building the raw table (bounded memory in the set-up)
CLI = str(Path(sys.executable).with_name("spam-mlops"))


def build_raw(lake_dir: Path, n: int) -> None:
    """A raw table of n messages resampled from the corpus, each made unique by a suffix (as bench/pipeline.py does),
    appended a million rows at a time (bounded memory in the set-up)."""
    import pandas as pd
    rows, _ = parse_lines(corpus_path().read_bytes())
    settings = get_settings(lake=str(lake_dir))
    raw = Table(Lake.from_settings(settings), RAW_TABLE, settings)
    for start in range(0, n, CHUNK):
        part = rows.sample(min(CHUNK, n - start), replace=True, random_state=start).reset_index(drop=True)
        part["text"] = part.text + " ref" + pd.Series([_letters(start + i) for i in part.index])
        part["message_id"] = [message_id(t) for t in part.text]
        part = part.assign(batch_id="b-bench", source="bench", line=start + part.index.astype("int64"),
                           ingested_at=pd.Timestamp("2026-01-01", tz="UTC"))
        raw.append(part[["message_id", "label", "text", "batch_id", "source", "line", "ingested_at"]])


class PeakMemory:
    """Sums of PSS and of RSS over a process tree (and the processes `extra()` names), sampled every 0.5 s;
    `.peak_pss` and `.peak_rss` in bytes."""
    def __init__(self, root: psutil.Process, extra=lambda: []):
        self.root, self.extra, self.peak_pss, self.peak_rss, self._stop = root, extra, 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try: procs = {p.pid: p for p in [self.root, *self.root.children(recursive=True), *self.extra()]}
            except psutil.NoSuchProcess: procs = {}
            pss = rss = 0
            for p in procs.values():
                try:
                    m = p.memory_full_info()  # /proc/PID/smaps_rollup
                    pss, rss = pss + m.pss, rss + m.rss
                except psutil.Error: pass
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self._stop.wait(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_stages(lake_dir: Path, env: dict, extra=lambda: []) -> tuple[float, int, int, str]:
    "Seconds for curate + features, peak summed PSS and RSS, and their output lines."
    t0, out = time.perf_counter(), []
    peak_pss = peak_rss = 0
    for stage in ("curate", "features"):
        proc = subprocess.Popen([CLI, stage], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with PeakMemory(psutil.Process(proc.pid), extra) as mem:
            text, _ = proc.communicate()
        if proc.returncode: raise SystemExit(f"{stage} failed:\n{text[-3000:]}")
        out.append(next((ln for ln in text.splitlines() if ln.startswith(f"{stage}:")), text.strip()[-200:]))
        peak_pss, peak_rss = max(peak_pss, mem.peak_pss), max(peak_rss, mem.peak_rss)
    return time.perf_counter() - t0, peak_pss, peak_rss, "; ".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--engines", nargs="+", default=["local", "ray-1", "ray-2"], choices=["local", "ray-1", "ray-2"])
    ap.add_argument("--block-rows", type=int, default=200_000)
    ap.add_argument("--object-store-mb", type=int, default=512, help="each Ray node's object store")
    ap.add_argument("--keep", type=Path, help="build the raw tables here and keep them (default: a temporary folder)")
    args = ap.parse_args()
    print(machine("ray", "pyarrow", "pandas", "deltalake"))
    work = args.keep or Path(tempfile.mkdtemp(prefix="spam-scale-"))
    results: dict[tuple[str, int], tuple[float, int]] = {}
    try:
        for n in args.sizes:
            src = work / f"raw-{n}"
            if not (src / "tables" / RAW_TABLE).exists():
                t0 = time.perf_counter()
                build_raw(src, n)
                print(f"set-up: raw table of {n:,} messages in {time.perf_counter() - t0:.0f} s", flush=True)
            for engine in args.engines:
                lake = work / f"run-{engine}-{n}"
                shutil.rmtree(lake, ignore_errors=True)
                shutil.copytree(src, lake)
                env = child_env(SPAM_MLOPS_LAKE=str(lake), SPAM_MLOPS_DATA_ENGINE=engine.split("-")[0],
                                SPAM_MLOPS_DATA_BLOCK_ROWS=str(args.block_rows), RAY_DATA_DISABLE_PROGRESS_BARS="1")
                env.pop("RAY_ADDRESS", None)
                if engine == "local": secs, pss, rss, out = run_stages(lake, env)
                else:
                    shape = {"workers": (), "head_cpus": 2} if engine == "ray-1" else {"workers": (1, 1)}
                    t0 = time.perf_counter()
                    with cluster.LocalCluster(**shape, object_store_mb=args.object_store_mb) as c:
                        print(f"  ({engine}: the local cluster started in {time.perf_counter() - t0:.0f} s, not "
                              "counted)", flush=True)
                        nodes = lambda c=c: [p for tag in c.nodes.values() for p in cluster.members(tag)]  # noqa: E731
                        secs, pss, rss, out = run_stages(lake, env | {"RAY_ADDRESS": c.address}, nodes)
                results[(engine, n)] = (secs, pss)
                print(f"{engine:6} {n:>11,}: {n / secs:>9,.0f} msg/s, {secs:7.1f} s, peak PSS {pss / 2**30:5.2f} GiB"
                      f" (RSS {rss / 2**30:5.2f} GiB)  [{out}]", flush=True)
                shutil.rmtree(lake, ignore_errors=True)
    finally:
        if not args.keep: shutil.rmtree(work, ignore_errors=True)
    lo, hi = min(args.sizes), max(args.sizes)
    print("\nsummary (baseline: the local engine, same run)")
    for engine in args.engines:
        if (engine, lo) not in results or (engine, hi) not in results: continue
        (t_lo, m_lo), (t_hi, m_hi) = results[(engine, lo)], results[(engine, hi)]
        line = (f"{engine:6}: time {hi:,}/{lo:,} = {t_hi / t_lo:.2f} (goal <= 11 for Ray), peak PSS ratio "
                f"{m_hi / m_lo:.2f} (goal <= 1.5 for Ray)")
        if engine != "local" and ("local", hi) in results:
            line += f", throughput vs local at {hi:,}: {results[('local', hi)][0] / t_hi:.2f}x"
            line += f" (at {lo:,}: {results[('local', lo)][0] / t_lo:.2f}x; goal >= 0.7 on one node)"
        print(line)


if __name__ == "__main__":
    main()
