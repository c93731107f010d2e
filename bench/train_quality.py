"""Full-size quality of the LSTM beside the char n-gram SVM baseline, on the fixed test split.

Usage: SPAM_MLOPS_LAKE=/path/to/lake .venv/bin/python bench/train_quality.py [--source feast|lake] [--features]
       [--ray N] [--nodes 2] [--seeds K] [key=value ...]
Prints the machine, the split, each model's test metrics and training time. Trains in-process through the same
`fit_model` loop that Ray Train and Ray Tune run (`--ray N` also trains through TensorflowTrainer with N workers).
`--nodes 2` starts a local two-node cluster (a 0-CPU head and two 1-CPU worker nodes, `cluster.LocalCluster`) and
trains, for each seed, through Ray Train with 1 worker and with 2 workers on the two nodes (each reading its own
shard), at the same global batch (1 x 2B vs 2 x B), then prints the mean and spread of each over the seeds
(the in-process seeds are left out then).
The training frame comes from Feast's historical retrieval as in `spam-mlops train` (run `spam-mlops feast-apply`
on that lake first), or with `--source lake` from the lake's features Parquet directly (the same frame).
"""
import argparse
import os
import platform
import time

import pandas as pd

from spam_mlops import cluster
from spam_mlops.config import get_settings
from spam_mlops.model import (
    DEFAULT_CONFIG,
    evaluate,
    export_model,
    fit_model,
    predict_texts,
    prepare_data,
    train_baseline,
)
from spam_mlops.train import run_trainer, split_frame, training_frame

GOAL = {"accuracy": 0.990, "f1": 0.960, "mcc": 0.955, "roc_auc": 0.990}


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = platform.processor() or platform.machine()
    return f"{platform.platform()} | {cpu} | {os.cpu_count()} CPUs | {mem:.0f} GB"


def _value(v: str):
    try: return int(v)
    except ValueError:
        try: return float(v)
        except ValueError: return v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", choices=["feast", "lake"], default="feast",
                    help="where the training frame's features come from")
    ap.add_argument("--features", action="store_true",
                    help="also train the LSTM with the tabular features as a second input")
    ap.add_argument("--ray", type=int, default=0, help="also train through Ray Train with this many workers")
    ap.add_argument("--seeds", type=int, default=1, help="repeat the LSTM with this many seeds")
    ap.add_argument("--nodes", type=int, choices=[0, 2], default=0,
                    help="2: 1 vs 2 Ray Train workers on a local two-node cluster, per seed")
    ap.add_argument("overrides", nargs="*", help="config key=value")
    a = ap.parse_args()
    cfg = DEFAULT_CONFIG | {k: _value(v) for k, v in (o.split("=", 1) for o in a.overrides)}
    print("machine:", machine())
    print("config:", cfg)
    t = time.time()
    parts = split_frame(training_frame(get_settings(), source=a.source))
    print(f"training frame: {a.source}, {sum(len(p) for p in parts.values())} rows in {time.time() - t:.1f} s")
    test = parts["test"]
    print("split:", {k: f"{len(p)} rows, {int(p.y.sum())} spam" for k, p in parts.items()})
    rows = {}
    t = time.time()
    _, base = train_baseline(parts)
    base_row = evaluate(test.y.values, base, 0.0) | {"train_s": time.time() - t}
    rows["baseline char 2-5 gram TF-IDF + LinearSVC"] = base_row

    def lstm(name, c, features=False, workers=0, settings=None):
        data = prepare_data(parts, c, features=features)
        t = time.time()
        if workers: net, hist = run_trainer(c, data, workers, settings=settings)
        else: net, hist = fit_model(c | {"features": features}, data)
        secs = time.time() - t
        if features:
            p = net.predict((data["x_test"], data["f_test"]), verbose=0)[:, 0]
        else:
            p = predict_texts(export_model(data["vocabulary"], net, c["max_len"]), test.clean_text)
        rows[name] = evaluate(test.y.values, p) | {"train_s": secs, "epochs": len(hist)}
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in rows[name].items()), flush=True)

    for s in range(a.seeds if not a.nodes else 0):  # --nodes compares Ray Train runs only
        lstm(f"LSTM seed {cfg['seed'] + s}", cfg | {"seed": cfg["seed"] + s})
    if a.features:
        for s in range(a.seeds):
            lstm(f"LSTM + tabular features seed {cfg['seed'] + s}", cfg | {"seed": cfg["seed"] + s}, features=True)
    if a.ray: lstm(f"LSTM via Ray Train, {a.ray} worker(s)", cfg, workers=a.ray)
    if a.nodes:
        with cluster.LocalCluster(workers=(1, 1), object_store_mb=512) as c:
            on = get_settings(ray_address=c.address)
            for s in range(a.seeds):
                seeded = cfg | {"seed": cfg["seed"] + s}
                lstm(f"Ray Train 1 worker, batch 2B, seed {seeded['seed']}",
                     seeded | {"batch_size": 2 * cfg["batch_size"]}, workers=1, settings=on)
                lstm(f"Ray Train 2 workers on 2 nodes, batch B, seed {seeded['seed']}", seeded, workers=2, settings=on)
    df = pd.DataFrame(rows).T
    pd.set_option("display.width", 200)
    print(df.round(4).to_string())
    if a.nodes:
        for kind in ("Ray Train 1 worker", "Ray Train 2 workers"):
            runs = df[df.index.str.startswith(kind)]
            print(f"{kind}: test MCC {runs.mcc.mean():.4f} ± {runs.mcc.std():.4f}, F1 {runs.f1.mean():.4f}, "
                  f"accuracy {runs.accuracy.mean():.4f} over {len(runs)} seed(s); {runs.train_s.mean():.0f} s a run")
    print("goal:", GOAL)
    for name, r in rows.items():
        miss = [k for k, v in GOAL.items() if r[k] < v]
        print(f"  {name}: {'meets the goal' if not miss else 'misses ' + ', '.join(miss)}")


if __name__ == "__main__":
    main()
