"""Training: the Feast training frame, split, model, the shared loop (in-process and on Ray Train with 2 workers),
MLflow run (live per-epoch metrics, Keras/TensorFlow flavour, drift baseline), registry gate."""
from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import mlflow.tensorflow
import numpy as np
import pandas as pd
import pytest
from support import feature_repo_copy

from spam_mlops import registry
from spam_mlops.config import get_settings
from spam_mlops.curate import clean_text, read_curated
from spam_mlops.feature_store import apply
from spam_mlops.features import FEATURES
from spam_mlops.lake import Lake
from spam_mlops.profile import BASELINE_ARTIFACT
from spam_mlops.registry import RegistryUnreachable
from spam_mlops.train import (
    DEFAULT_CONFIG,
    TRAIN_DIR,
    RegistryError,
    TrainError,
    build_model,
    class_weights,
    epoch_logger,
    export_model,
    fit_model,
    git_commit,
    load_keras_model,
    predict_texts,
    prepare_data,
    promote,
    run_trainer,
    sample_frame,
    split_frame,
    split_of,
    train,
    training_frame,
)

TINY = {"max_len": 24, "embedding_dim": 8, "lstm_units": 8, "epochs": 2, "batch_size": 32}


@pytest.fixture(scope="module")
def feast_repo(pipeline_lake, tmp_path_factory):
    "A private feature repo with the Feast definitions applied over the pipeline lake (`spam-mlops feast-apply`)."
    repo = feature_repo_copy(tmp_path_factory.mktemp("feast") / "feature_repo")
    apply(get_settings(lake=pipeline_lake.lake, feature_repo=repo, online_store="sqlite"))
    return repo


def _settings(pipeline_lake, feast_repo, **kw):
    "Settings for the pipeline lake and the applied feature repo (read after `tracking` has set MLFLOW_TRACKING_URI)."
    return get_settings(lake=pipeline_lake.lake, feature_repo=feast_repo, online_store="sqlite", **kw)


def _frame(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype("int64")
    words = np.where(y[:, None], rng.choice(["win", "prize", "cash", "xphone"], (n, 4)),
                     rng.choice(["ok", "home", "later", "dinner"], (n, 4)))
    return pd.DataFrame({"message_id": [f"{i:016x}" for i in range(n)], "label": np.where(y, "spam", "ham"),
                         "clean_text": [" ".join(w) for w in words], "y": y})


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    "A fresh SQLite tracking store; yields settings pointing at the session lake and it."
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    mlflow.set_tracking_uri(None)


# --- split ---------------------------------------------------------------------------------------------------------

def test_split_is_a_pure_function_of_message_id():
    ids = pd.Series([f"{i:016x}" for i in range(2000)])
    a = split_of(ids)
    b = split_of(ids.iloc[::-1].reset_index(drop=True))[::-1]  # other order
    c = split_of(ids.iloc[:500])  # other rows around it
    assert (a == b).all() and (a[:500] == c).all()
    frac = pd.Series(a).value_counts(normalize=True)
    assert abs(frac["train"] - 0.8) < 0.03 and abs(frac["val"] - 0.1) < 0.02 and abs(frac["test"] - 0.1) < 0.02


def test_split_frame_is_stratified_and_stable(pipeline_lake):
    df = training_frame(pipeline_lake, source="lake")
    parts = split_frame(df)
    assert sum(len(p) for p in parts.values()) == len(df)
    for p in parts.values():  # same spam share in every split (within sampling noise)
        assert abs(p.y.mean() - df.y.mean()) < 0.03
    again = split_frame(df.sample(frac=1.0, random_state=1))
    assert set(again["test"].message_id) == set(parts["test"].message_id)
    sub = split_frame(sample_frame(df, 1000))  # a sample keeps every message in its split
    assert set(sub["test"].message_id) <= set(parts["test"].message_id)


def test_training_frame_joins_features(pipeline_lake):
    df = training_frame(pipeline_lake, source="lake")
    assert len(df) == len(read_curated(Lake.from_settings(pipeline_lake)))
    assert {"message_id", "label", "clean_text", "y", "text_length", "has_url"} <= set(df.columns)


def test_feast_frame_equals_the_lake_join(pipeline_lake, feast_repo):
    "Feast's historical retrieval gives the same rows, labels and feature values as the direct join, sorted by id."
    s = _settings(pipeline_lake, feast_repo)
    feast, lake = training_frame(s), training_frame(s, source="lake")
    assert len(feast) == len(read_curated(Lake.from_settings(s))) and feast.message_id.is_unique
    assert feast.message_id.is_monotonic_increasing
    pd.testing.assert_frame_equal(feast, lake)  # same ids, labels, texts, feature values and dtypes, same order


def test_feast_frame_needs_the_definitions_applied(pipeline_lake, tmp_path):
    s = get_settings(lake=pipeline_lake.lake, feature_repo=feature_repo_copy(tmp_path / "repo"), online_store="sqlite")
    with pytest.raises(TrainError, match="not in the registry.*spam-mlops feast-apply"):
        training_frame(s)


def test_feast_frame_names_lost_messages(pipeline_lake, tmp_path):
    "A features Parquet without some curated messages: Feast cannot fill them, training stops naming the count."
    lake_dir = tmp_path / "lake"
    shutil.copytree(pipeline_lake.lake, lake_dir)
    s = get_settings(lake=str(lake_dir), feature_repo=feature_repo_copy(tmp_path / "repo"), online_store="sqlite")
    lk = Lake.from_settings(s)
    feats = lk.read_parquet(FEATURES)
    lk.write_parquet(FEATURES, feats.iloc[3:].reset_index(drop=True))
    apply(s)
    lost = rf"lost curated messages: 3 of {len(feats)} entity rows .*spam-mlops feast-apply"
    with pytest.raises(TrainError, match=lost):
        training_frame(s)
    with pytest.raises(TrainError, match="3 curated messages have no features"):
        training_frame(s, source="lake")


def test_unknown_features_source(pipeline_lake):
    with pytest.raises(TrainError, match="features source 'redis'"):
        training_frame(pipeline_lake, source="redis")


@pytest.mark.parametrize("df, msg", [(_frame().iloc[:0], "empty"), (_frame().query("y == 0"), "single class"),
                                     (_frame(6), "not both classes")])
def test_bad_training_sets(df, msg):
    with pytest.raises(TrainError, match=msg):
        split_frame(df)


def test_missing_curated_data(tmp_path):
    for source in ("feast", "lake"):
        with pytest.raises(TrainError, match="no curated data"):
            training_frame(get_settings(lake=str(tmp_path / "empty")), source=source)


# --- model and loop ------------------------------------------------------------------------------------------------

def test_build_model_is_the_seed_network():
    m = build_model(100, 16, 20, 0.3, 12)
    assert [type(layer).__name__ for layer in m.layers] == ["InputLayer", "Embedding", "LSTM", "Dense"]
    assert m.output.shape == (None, 1) and m.loss == "binary_crossentropy"
    assert m.get_layer("lstm").units == 20 and m.get_layer("embedding").output_dim == 16


def test_class_weights_balance_the_classes():
    y = np.array([0] * 90 + [1] * 10)
    w = class_weights(y)
    assert w[0] * 90 == pytest.approx(w[1] * 10)
    assert class_weights(y, 0.0) == {0: 1.0, 1: 1.0}


def test_fit_model_reports_each_epoch_and_stops_early():
    parts = split_frame(_frame(600))
    c = DEFAULT_CONFIG | TINY | {"epochs": 30, "patience": 1, "learning_rate": 0.05}
    data = prepare_data(parts, c)
    seen = []
    net, hist = fit_model(c, data, report=seen.append)
    assert seen == hist and len(hist) < 30  # early stopping ended it
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "val_mcc"} <= set(hist[0])
    served = export_model(data["vocabulary"], net, c["max_len"])
    assert served.input.dtype == "string" and type(served.layers[1]).__name__ == "TextVectorization"
    p = predict_texts(served, parts["test"].clean_text)
    assert ((p > 0.5) == parts["test"].y.values).mean() > 0.95


def test_epoch_logger_logs_each_epoch_as_it_ends(tracking):
    "In-process training: after each epoch's report the MLflow run already holds that epoch (not after the run)."
    parts = split_frame(_frame(400))
    c = DEFAULT_CONFIG | TINY | {"epochs": 3, "patience": 10}
    client = mlflow.MlflowClient(tracking)
    run_id = client.create_run(client.create_experiment("live")).info.run_id
    log, seen = epoch_logger(run_id, tracking), []

    def report(m):
        log(m)
        seen.append([h.step for h in client.get_metric_history(run_id, "val_loss")])
    _, hist = fit_model(c, prepare_data(parts, c), report=report)
    assert seen == [[1], [1, 2], [1, 2, 3]]
    for k in ("loss", "accuracy", "val_loss", "val_accuracy"):
        h = client.get_metric_history(run_id, k)
        assert [m.step for m in h] == [1, 2, 3] and [m.value for m in h] == pytest.approx([e[k] for e in hist])


def test_ray_train_with_two_workers(tracking, tmp_path):
    """Two workers; rank 0 alone logs each epoch to the MLflow run from inside Ray Train (the driver logs nothing).
    Ray Train's run folder is in the lake (every node reaches it) and is removed once the model is back."""
    import ray
    parts = split_frame(_frame(400))
    c = DEFAULT_CONFIG | TINY
    data = prepare_data(parts, c)
    client = mlflow.MlflowClient(tracking)
    run_id = client.create_run(client.create_experiment("ray")).info.run_id
    lake = tmp_path / "lake"
    net, hist = run_trainer(c, data, workers=2, mlflow_run=(run_id, tracking), settings=get_settings(lake=str(lake)))
    assert (lake / TRAIN_DIR).is_dir() and not list((lake / TRAIN_DIR).iterdir())
    assert not ray.is_initialized()  # run_trainer started Ray through spam_mlops.cluster and stopped it again
    assert len(hist) == 2 and hist[-1]["val_accuracy"] > 0.9
    for k in ("loss", "accuracy", "val_loss", "val_accuracy"):
        logged = [(m.step, m.value) for m in client.get_metric_history(run_id, k)]
        assert logged == [(e["epoch"], pytest.approx(e[k])) for e in hist]
    p = predict_texts(export_model(data["vocabulary"], net, c["max_len"]), parts["test"].clean_text)
    assert ((p > 0.5) == parts["test"].y.values).mean() > 0.9


def test_clean_text_is_idempotent(pipeline_lake):
    cur = read_curated(Lake.from_settings(pipeline_lake))
    assert (clean_text(cur.clean_text).astype(str).values == cur.clean_text.astype(str).values).all()


# --- MLflow run, registry, gate ------------------------------------------------------------------------------------

def test_train_logs_a_complete_run_and_gates(pipeline_lake, feast_repo, tracking):
    s = _settings(pipeline_lake, feast_repo)
    first = train(s, TINY | {"epochs": 3, "patience": 10}, sample_n=1200, workers=0, recall_floor=0.0)
    run = mlflow.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    params, metrics = run.data.params, run.data.metrics
    assert {"embedding_dim", "lstm_units", "dropout", "batch_size", "raw_sha256", "git_commit"} <= set(params)
    assert params["features_source"] == "feast"
    assert params["raw_sha256"] == Lake.from_settings(s).read_json("raw/manifest.json")["source_sha256"]
    for k in ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc", "mcc"):
        assert f"test_{k}" in metrics and f"baseline_test_{k}" in metrics
    client = mlflow.MlflowClient()
    assert len(first.history) == 3
    for k in ("loss", "accuracy", "val_loss", "val_accuracy"):  # one point per epoch, step = epoch
        assert [m.step for m in client.get_metric_history(first.run_id, k)] == [1, 2, 3]
    arts = {a.path for a in client.list_artifacts(first.run_id, "plots")}
    assert arts == {"plots/confusion_matrix.html", "plots/roc_curve.html", "plots/pr_curve.html"}
    assert {a.path for a in client.list_artifacts(first.run_id, "tokenizer")} >= {"tokenizer/vocabulary.txt"}
    assert first.gate["decision"] == "promoted" and run.data.tags["gate.decision"] == "promoted"
    champ = client.get_model_version_by_alias(s.model_name, "champion")
    assert str(champ.version) == first.version

    # the champion: one .keras file, loadable as Keras and as pyfunc on a DataFrame of raw strings
    local = mlflow.artifacts.download_artifacts(f"models:/{s.model_name}@champion")
    assert len(list(Path(local).rglob("*.keras"))) == 1
    k = load_keras_model(f"models:/{s.model_name}@champion")
    assert k.input.dtype == "string" and k.output.shape == (None, 1)
    texts = ["WINNER!! Claim your £900 prize, call 09061701461", "ok see you at home"]
    p = mlflow.pyfunc.load_model(f"models:/{s.model_name}@champion").predict(pd.DataFrame({"text": texts}))
    assert p.shape == (2,) and 0 <= p.min() and p.max() <= 1

    # the same network in MLflow's TensorFlow/Keras flavour, beside it in the run: signature, example, same predictions
    flav_uri = run.data.tags["keras_model_uri"]
    info = mlflow.models.get_model_info(flav_uri)
    assert "tensorflow" in info.flavors and info.run_id == first.run_id and info.saved_input_example_info
    assert info.signature.inputs.to_dict() == [{"type": "tensor", "tensor-spec": {"dtype": "str", "shape": (-1, 1)}}]
    example = mlflow.models.Model.load(flav_uri).load_input_example(mlflow.artifacts.download_artifacts(flav_uri))
    assert example.shape == (3, 1)
    flav = mlflow.tensorflow.load_model(flav_uri)
    clean = clean_text(pd.Series(texts, dtype="string")).astype(str).tolist()
    assert np.abs(predict_texts(flav, clean) - p).max() < 1e-5

    # the drift baseline of this model is in its run
    base = mlflow.artifacts.load_dict(f"runs:/{first.run_id}/{BASELINE_ARTIFACT}")
    assert base["model"] == {"name": s.model_name, "version": first.version, "run_id": first.run_id}
    assert base["rows"]["train"] == int(params["rows_train"]) and base["rows"]["reference"] == int(params["rows_val"])
    assert set(base["features"]) >= {"text_length", "has_url"} and 0 <= base["prediction"]["spam_rate"] <= 1
    assert run.data.tags["drift.baseline"] == BASELINE_ARTIFACT

    # a deliberately worse model gets challenger but not champion; both scores are on its run
    worse = train(s, TINY | {"epochs": 1, "lstm_units": 1, "embedding_dim": 1, "learning_rate": 1e-6},
                  sample_n=1200, workers=0, recall_floor=0.0)
    assert worse.gate["decision"].startswith("rejected")
    assert str(client.get_model_version_by_alias(s.model_name, "champion").version) == first.version
    assert str(client.get_model_version_by_alias(s.model_name, "challenger").version) == worse.version
    wm = mlflow.get_run(worse.run_id).data.metrics
    assert wm["gate_champion_mcc"] == pytest.approx(first.metrics["mcc"], abs=1e-6)
    assert wm["gate_challenger_mcc"] < wm["gate_champion_mcc"]


def test_gate_rules(pipeline_lake, tracking):
    s = get_settings(lake=pipeline_lake.lake)
    train(s, TINY, sample_n=600, workers=0, recall_floor=0.0, features_source="lake")
    client = mlflow.MlflowClient()
    v = client.get_model_version_by_alias(s.model_name, "champion").version
    test = split_frame(sample_frame(training_frame(s, source="lake"), 600))["test"]
    low_recall = promote(client, s.model_name, v, {"mcc": 1.0, "recall": 0.5}, test, recall_floor=0.9)
    assert low_recall["decision"] == "rejected: spam recall 0.500 on the corpus test split is below the floor 0.90"
    worse = promote(client, s.model_name, v, {"mcc": -1.0, "recall": 1.0}, test)
    assert worse["decision"].startswith("rejected: corpus test MCC -1.000 is more than 0.01 below the champion's")
    champ_mcc = worse["champion_mcc"]  # within the margin: the challenger does not regress, it is promoted
    close = promote(client, s.model_name, v, {"mcc": champ_mcc - 0.005, "recall": 1.0}, test)
    assert close["decision"] == "promoted" and close["recent_used"] is False
    assert [h["version"] for h in registry.champion_history(client, s.model_name)][-1] == str(v)


def test_train_without_feast_apply_fails_clearly(pipeline_lake, tmp_path, tracking):
    s = get_settings(lake=pipeline_lake.lake, feature_repo=feature_repo_copy(tmp_path / "repo"), online_store="sqlite")
    with pytest.raises(TrainError, match="spam-mlops feast-apply"):
        train(s, TINY, workers=0)
    runs = mlflow.search_runs(experiment_names=[s.experiment])
    assert runs.status.tolist() == ["FAILED"] and "feast-apply" in runs["tags.error"][0]


def test_failed_run_is_marked_failed(tmp_path, tracking):
    s = get_settings(lake=str(tmp_path / "nolake"))
    with pytest.raises(TrainError, match="no curated data"):
        train(s, TINY, workers=0)
    runs = mlflow.search_runs(experiment_names=[s.experiment])
    assert runs.status.tolist() == ["FAILED"] and "no curated data" in runs["tags.error"][0]


def test_unreachable_tracking_server(pipeline_lake):
    from conftest import free_port
    s = get_settings(lake=pipeline_lake.lake, mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RegistryUnreachable, match="does not answer"):
        train(s, TINY, workers=0)


def test_train_leaves_the_process_tracking_uri_alone(tmp_path, tracking):
    "train() points MLflow's fluent API at the settings' tracking server for its run only (registry.using)."
    s = get_settings(lake=str(tmp_path / "nolake"), mlflow_tracking_uri=tracking)
    elsewhere = f"sqlite:///{tmp_path}/elsewhere.db"
    mlflow.set_tracking_uri(elsewhere)  # (mlflow also sets MLFLOW_TRACKING_URI for subprocesses)
    with pytest.raises(TrainError, match="no curated data"):
        train(s, TINY, workers=0)
    assert mlflow.get_tracking_uri() == elsewhere and mlflow.get_registry_uri() == elsewhere
    client = mlflow.MlflowClient(tracking)
    assert len(client.search_runs([client.get_experiment_by_name("spam_detection").experiment_id])) == 1


def test_git_commit_comes_from_the_settings_first():
    assert git_commit(get_settings(git_commit="0123abc")) == "0123abc"
    found = git_commit(get_settings(git_commit=""))  # from `git rev-parse HEAD` in a checkout
    assert found == "unknown" or len(found) == 40


def test_unknown_registered_model(tracking):
    with pytest.raises(RegistryError, match="no_such_model"):
        load_keras_model("models:/no_such_model@champion")


def test_unknown_config_key(pipeline_lake, tracking):
    with pytest.raises(TrainError, match="lstm_unit"):
        train(get_settings(lake=pipeline_lake.lake), {"lstm_unit": 3}, workers=0)
