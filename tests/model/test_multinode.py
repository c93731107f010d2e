"""Training and tuning on a real multi-node Ray cluster (issue 15, items 3 and 4): a 0-CPU head and two 1-CPU worker
nodes, separate raylets with their own object stores (`cluster.LocalCluster`), joined through `ray_address` as a
RayJob's driver joins its cluster. Ray Train's two workers run on the two worker nodes, each reading its own shard of
the train split, and train to the quality of the in-process loop on the same data; tuning trials run on both nodes.
Where each actor ran is read from Ray's state API (dead actors included)."""
from __future__ import annotations

import mlflow
import pytest
from support import worker_nodes

from spam_mlops import cluster
from spam_mlops.config import get_settings
from spam_mlops.lake import Lake
from spam_mlops.model import evaluate, export_model, fit_model, predict_texts
from spam_mlops.train import DEFAULT_CONFIG, run_trainer
from spam_mlops.tune import _prepare, search

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = {"max_len": 24, "embedding_dim": 16, "lstm_units": 16, "epochs": 6, "batch_size": 16, "patience": 10}


def _actors(c: cluster.LocalCluster) -> dict[str, tuple[str, str]]:
    "Every actor the cluster has had (alive or dead): actor id -> (class name, node id)."
    from ray.util.state import list_actors
    got = list_actors(address=c.dashboard_url, detail=True, limit=10_000, raise_on_missing_output=False)
    return {a.actor_id: (a.class_name, a.node_id) for a in got}


def test_training_puts_its_two_workers_on_two_nodes(two_nodes, pipeline_lake, tmp_path):
    c = DEFAULT_CONFIG | TINY
    data, parts = _prepare(Lake.from_settings(pipeline_lake), 1500, 42, c)
    before = _actors(two_nodes)
    settings = get_settings(lake=str(tmp_path / "lake"), ray_address=two_nodes.address)
    net, hist = run_trainer(c, data, workers=2, settings=settings)
    new = {k: v for k, v in _actors(two_nodes).items() if k not in before}
    placed = [node for name, node in new.values() if name == "RayTrainWorker"]
    assert len(placed) == 2 and set(placed) == worker_nodes(two_nodes), new  # one worker per worker node
    assert len(hist) == TINY["epochs"]
    test = parts["test"]
    sharded = evaluate(test.y.values, predict_texts(export_model(data["vocabulary"], net, c["max_len"]),
                                                     test.clean_text))
    # the same loop in one process on every train row, with the same global batch (2 workers x batch_size)
    whole, _ = fit_model(c | {"batch_size": 2 * c["batch_size"]}, data)
    local = evaluate(test.y.values, predict_texts(export_model(data["vocabulary"], whole, c["max_len"]),
                                                  test.clean_text))
    print(f"test MCC: 2 workers on 2 nodes {sharded['mcc']:.3f}, in-process {local['mcc']:.3f}")
    assert sharded["mcc"] > 0.8 and local["mcc"] > 0.8
    assert abs(sharded["mcc"] - local["mcc"]) < 0.1  # one seed; bench/train_quality.py --nodes 2 averages three


def test_tuning_trials_run_on_both_nodes(two_nodes, pipeline_lake, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    settings = get_settings(lake=pipeline_lake.lake, mlflow_tracking_uri=uri, ray_address=two_nodes.address)
    space = {"embedding_dim": ("grid", [8, 16]), "lstm_units": ("choice", [8]), "batch_size": ("choice", [32]),
             "dropout": ("uniform", 0.1, 0.3)}
    before = _actors(two_nodes)
    try:
        rep = search(settings, space=space, num_samples=1, epochs=2, grace_period=2, concurrency=2, sample_n=800,
                     config={"max_len": 24}, retrain=False)
    finally: mlflow.set_tracking_uri(None)
    assert rep.trials == 2 and rep.errored == 0, rep.table
    new = {k: v for k, v in _actors(two_nodes).items() if k not in before}
    trials = {node for name, node in new.values() if "run_trial" in name or "ImplicitFunc" in name}
    assert trials == worker_nodes(two_nodes), sorted({name for name, _ in new.values()})  # trials on both nodes
