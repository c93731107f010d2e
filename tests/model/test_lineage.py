"""Training on corpus plus feedback, and the data lineage of a model: the frame's rows and sources, the feedback
cap, the digest and `--as-of` rebuilds (also of a vacuumed version), the gate on the recent (feedback) test split,
and rollback. Real tables on a lake folder, a real SQLite registry, real (tiny) trainings."""
from __future__ import annotations

import shutil

import mlflow
import pandas as pd
import pytest
from typer.testing import CliRunner

from spam_mlops import registry
from spam_mlops.cli import app
from spam_mlops.config import TrainSettings, get_settings
from spam_mlops.curate import clean_text
from spam_mlops.demo import campaign
from spam_mlops.features import FEATURE_TYPES, compute_features
from spam_mlops.frame import FEEDBACK_SOURCE, TrainError, frame_digest, resolve_as_of
from spam_mlops.ingest import message_id
from spam_mlops.lake import Lake
from spam_mlops.predlog import FEEDBACK, feedback_frame
from spam_mlops.tables import Table
from spam_mlops.train import build_frame, load_keras_model, predict_texts, promote, split_frame, split_recent, train

TINY = {"max_len": 24, "embedding_dim": 8, "lstm_units": 8, "epochs": 3, "batch_size": 32, "patience": 10}
T0 = pd.Timestamp("2026-12-01T08:00:00Z")


def _campaign(n: int, seed: int) -> pd.DataFrame:
    "A labelled smishing wave (parcel fees: spam; one-time codes, deliveries: ham), as text,label."
    rows = [line.split("\t", 1) for line in campaign(n, seed).decode().splitlines()]
    return pd.DataFrame(rows, columns=["label", "text"]).drop_duplicates("text", ignore_index=True)


def _label(lake: Lake, df: pd.DataFrame, start: pd.Timestamp = T0) -> int:
    "Append `df` (text, label[, api_key_id]) to the feedback table as imported labels, one second apart; its version."
    df = df.assign(received_at=[start + pd.Timedelta(seconds=i) for i in range(len(df))])
    return Table(lake, FEEDBACK).append(feedback_frame(df, "import"))


@pytest.fixture(scope="module")
def lake_dir(tmp_path_factory, corpus):
    "A lake with the pipeline run on the corpus (raw, curated, features), copied by each test that changes it."
    from support.data import pipeline_settings
    root = tmp_path_factory.mktemp("lineage") / "lake"
    pipeline_settings(root, corpus)
    return root


@pytest.fixture
def lake(lake_dir, tmp_path):
    "Settings of a private copy of the pipeline lake and a fresh SQLite registry."
    shutil.copytree(lake_dir, tmp_path / "lake")
    s = get_settings(lake=str(tmp_path / "lake"), mlflow_tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    yield s, Lake.from_settings(s)
    mlflow.set_tracking_uri(None)


def test_frame_is_corpus_plus_feedback_with_sources(lake):
    s, lk = lake
    corpus, _ = build_frame(s, source="lake")
    assert (corpus.source != FEEDBACK_SOURCE).all() and corpus.source.str.startswith("b-").all()
    wave = _campaign(300, 1)
    wave["api_key_id"] = ["key-a", "key-b"] * (len(wave) // 2) + ["key-a"] * (len(wave) % 2)
    cur = Table(lk, "curated", s).read()
    known = cur.iloc[0]  # a corpus message labelled the other way: the corpus label wins
    clash = pd.DataFrame({"text": [known.text], "label": ["ham" if known.label == "spam" else "spam"],
                          "api_key_id": ["key-a"]})
    unknown = pd.DataFrame({"prediction_id": ["no-such-prediction"], "label": ["spam"], "api_key_id": ["key-a"]})
    fv = _label(lk, pd.concat([wave, clash, unknown], ignore_index=True))
    df, lin = build_frame(s, source="lake")
    fb = df[df.source == FEEDBACK_SOURCE]
    assert len(fb) == len(wave) and len(df) == len(corpus) + len(wave) and df.message_id.is_unique
    assert set(fb.message_id) == {message_id(t) for t in wave.text}
    assert df.set_index("message_id").label[known.message_id] == known.label
    assert lin["feedback"]["feedback_in_corpus"] == 1 and lin["feedback"]["feedback_in_corpus_other_label"] == 1
    assert sum(lin["feedback"]["quarantined"].values()) == 1  # the unknown prediction id, with its reason
    assert lin["versions"]["feedback"] == fv and lin["versions"]["curated"] == Table(lk, "curated", s).version()
    assert lin["rows"][FEEDBACK_SOURCE] == len(wave) and lin["rows_total"] == len(df)
    # the same curate and feature code as the corpus
    first = wave.set_index(wave.text.map(message_id)).loc[fb.message_id.iloc[0]]
    assert fb.clean_text.iloc[0] == clean_text(pd.Series([first.text])).iloc[0]
    expected = compute_features([first.text]).iloc[0]
    assert (fb[list(FEATURE_TYPES)].iloc[0].values == expected.values).all()
    assert set(fb.api_key_id) == {"key-a", "key-b"} and df.y.isin([0, 1]).all()
    # splits stay stable by message_id: the corpus rows keep the split they had without feedback
    assert set(split_frame(df)["test"].query("source != @FEEDBACK_SOURCE").message_id) == \
        set(split_frame(corpus)["test"].message_id)


def test_feedback_share_is_capped_newest_kept(lake):
    s, lk = lake
    wave = _campaign(400, 2)
    _label(lk, wave)
    n_corpus = len(build_frame(s, source="lake", feedback=False)[0])
    df, lin = build_frame(s, source="lake", share_max=0.02)
    cap = int(0.02 / 0.98 * n_corpus)
    fb = df[df.source == FEEDBACK_SOURCE]
    assert len(fb) == cap < len(wave) and lin["feedback"]["feedback_over_cap"] == len(wave) - cap
    assert set(fb.message_id) == set(wave.text.tail(cap).map(message_id))  # the newest (received last)
    assert len(build_frame(s, source="lake", share_max=0.0)[0]) == n_corpus


def test_digest_is_stable_and_as_of_rebuilds_the_logged_frame(lake):
    s, lk = lake
    _label(lk, _campaign(200, 3))
    df, lin = build_frame(s, source="lake")
    assert frame_digest(df.sample(frac=1.0, random_state=0)) == lin["digest"]
    report = train(s, TINY | {"epochs": 1}, sample_n=600, workers=0, recall_floor=0.0, features_source="lake")
    run = mlflow.MlflowClient(s.mlflow_tracking_uri).get_run(report.run_id)
    assert run.data.tags["data.digest"] == lin["digest"] == report.lineage["digest"]
    assert run.data.tags["data.feedback_version"] == str(lin["versions"]["feedback"])
    ds = run.inputs.dataset_inputs[0]
    assert ds.dataset.name == "training_frame" and ds.dataset.digest == lin["digest"][:32]
    assert {t.key: t.value for t in ds.tags}[f"rows.{FEEDBACK_SOURCE}"] == str(lin["rows"][FEEDBACK_SOURCE])
    # more data arrives: the latest frame changes, the logged one is rebuilt exactly from the tables' history
    _label(lk, _campaign(100, 4), T0 + pd.Timedelta("1d"))
    assert build_frame(s, source="lake")[1]["digest"] != lin["digest"]
    for spec in (f"run:{report.run_id}", f"model:{report.version}"):
        versions = resolve_as_of(spec, s)
        assert versions["digest"] == lin["digest"]
        assert build_frame(s, source="lake", as_of=versions)[1]["digest"] == lin["digest"]
    by_curated = resolve_as_of(str(lin["versions"]["curated"]), s)  # the curated version alone: as of its commit
    assert by_curated["curated"] == lin["versions"]["curated"] and by_curated["feedback"] is None
    with pytest.raises(TrainError, match="no table versions"):
        resolve_as_of(f"run:{mlflow.MlflowClient(s.mlflow_tracking_uri).create_run('0').info.run_id}", s)


def test_as_of_a_vacuumed_version_names_the_oldest_readable(lake, tmp_path):
    from spam_mlops.curate import curate
    from spam_mlops.ingest import ingest
    s, lk = lake
    batch = tmp_path / "second.txt"
    batch.write_bytes(campaign(100, 5))
    ingest(s, source=str(batch))
    curate(s)
    cur = Table(lk, "curated", s)
    first = int(cur.history().version.min())
    cur.compact(min_files=2)
    cur.vacuum(retention_hours=0)
    oldest = cur.oldest_readable_version()
    assert oldest > first
    with pytest.raises(TrainError, match=rf"version {first} is no longer readable.*the oldest readable is {oldest}"):
        build_frame(s, source="lake", as_of=resolve_as_of(str(first), s))
    with pytest.raises(TrainError, match=f"the oldest readable is {oldest}"):
        train(s, TINY, workers=0, features_source="lake", as_of=str(first))


def test_gate_uses_the_recent_split_and_rollback(lake):
    s, lk = lake
    gate = get_settings(TrainSettings, recall_floor=0.0, mcc_margin=0.3, recent_min_rows=20)
    client = registry.client(s.mlflow_tracking_uri)
    old = train(s, TINY, sample_n=800, workers=0, features_source="lake", gate=gate)  # the corpus alone
    assert old.gate["decision"] == "promoted" and old.gate["recent_rows"] == 0
    _label(lk, _campaign(500, 6))  # the shift, labelled: about 50 rows in the recent test split
    new = train(s, TINY, sample_n=800, workers=0, features_source="lake", gate=gate)
    g = new.gate
    assert g["recent_used"] and g["recent_rows"] >= 20 and g["champion_version"] == old.version
    assert g["challenger_recent_mcc"] > g["champion_recent_mcc"] and g["decision"] == "promoted", g
    metrics = client.get_run(new.run_id).data.metrics
    assert metrics["gate_champion_recent_mcc"] == pytest.approx(g["champion_recent_mcc"])
    assert {"gate_challenger_recent_mcc", "gate_champion_mcc", "recent_test_mcc"} <= set(metrics)
    assert registry.data_versions(client, s.model_name, new.version)["digest"] == new.lineage["digest"]
    # the old model as a challenger now: fine on the corpus, but it does not beat the champion on recent data
    test, recent = split_recent(split_frame(build_frame(s, source="lake")[0])["test"])
    net = load_keras_model(f"models:/{s.model_name}/{old.version}", s.mlflow_tracking_uri)
    from spam_mlops.train import evaluate
    on = lambda part: evaluate(part.y.values, predict_texts(net, part.clean_text))  # noqa: E731
    wide = gate.model_copy(update={"mcc_margin": 1.0})  # the corpus rule cannot refuse it: the recent rule must
    again = promote(client, s.model_name, old.version, on(test), test, recent=recent, challenger_recent=on(recent),
                    cfg=wide)
    assert again["decision"].startswith("rejected: recent test MCC") and "does not beat the champion's" in \
        again["decision"], again
    assert str(registry.alias_version(client, s.model_name).version) == new.version
    # rollback: back to the previous champion, kept in the alias history
    env = {"MLFLOW_TRACKING_URI": s.mlflow_tracking_uri}
    r = CliRunner().invoke(app, ["-v", "rollback", "--reason", "test"], env=env)
    assert r.exit_code == 0 and f"champion {new.version} → {old.version}" in r.output, r.output
    assert str(registry.alias_version(client, s.model_name).version) == old.version
    hist = registry.champion_history(client, s.model_name)
    assert [h["version"] for h in hist] == [old.version, new.version, old.version] and hist[-1]["reason"] == "test"
    r = CliRunner().invoke(app, ["-v", "rollback"], env=env)
    assert r.exit_code == 1 and "no previous champion" in r.output
