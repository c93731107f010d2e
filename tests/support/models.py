"""Models for tests: register a `.keras` model as the champion of a tracking server, and the small trained
champion that serving and fault tests run on."""
from __future__ import annotations

import tempfile
from pathlib import Path

SPAM_TEXT = "WINNER!! You have been selected to receive a £900 prize reward! To claim call 09061701461."
PIP = ["mlflow", "tensorflow-cpu", "keras", "pandas"]  # stated, not inferred (inferring costs ~15 s a model)


def _experiment(client, name: str, artifacts: Path | None) -> str:
    "The id of experiment `name`, created (with its artifacts under `artifacts`, if given) when missing."
    exp = client.get_experiment_by_name(name)
    if exp: return exp.experiment_id
    return client.create_experiment(name, artifact_location=str(artifacts) if artifacts else None)


def register_champion(tracking_uri: str,  # the tracking server (http://..., sqlite:///...): also the registry
                      model,  # a `.keras` file, or a Keras model (saved to a temporary file)
                      name: str = "spam_detection",  # the registered model
                      alias: str = "champion",  # the alias moved to the new version
                      experiment: str = "tests",  # the run's experiment (created when missing)
                      artifacts: Path | None = None) -> str:  # artifact folder of a new experiment (SQLite stores)
    """Log `model` as the production pyfunc wrapper (spam_mlops.model.SpamModel around one `.keras` file), register
    it under `name` and move `alias` to it; the new version. MLflow's process-wide URIs are restored afterwards."""
    import mlflow

    from spam_mlops import registry
    from spam_mlops.model import SpamModel
    with tempfile.TemporaryDirectory() as d, registry.using(tracking_uri) as client:
        path = Path(model) if isinstance(model, (str, Path)) else Path(d) / "model.keras"
        if not isinstance(model, (str, Path)): model.save(path)
        with mlflow.start_run(experiment_id=_experiment(client, experiment, artifacts)):
            info = mlflow.pyfunc.log_model(name="model", python_model=SpamModel(), artifacts={"keras_model": str(path)},
                                           registered_model_name=name, pip_requirements=PIP)
        version = str(info.registered_model_version)
        client.set_registered_model_alias(name, alias, version)
    return version


def demo_model(texts, labels, epochs: int = 1):
    "The demo LSTM (serving contract: raw string in, spam probability out) fitted on `texts` and 0/1 `labels`."
    from spam_mlops.demo import build_demo_model
    return build_demo_model(texts, labels, epochs=epochs)


def train_champion(tmp: Path,  # folder for the lake, the SQLite registry, its artifacts and the model file
                   epochs: int = 1,  # quality is not the point of a serving or fault test
                   sample: int | None = 2000,  # messages to fit on (None: all)
                   name: str = "spam_detection"):  # the registered model
    """Ingest and curate the corpus into a lake under `tmp`, fit the demo LSTM on `sample` messages for `epochs`
    epochs, register it as the champion of `name` in a SQLite registry under `tmp`.
    Returns (settings, model URI, version)."""
    from spam_mlops.curate import read_curated
    from spam_mlops.lake import Lake

    from .data import pipeline_settings
    settings = pipeline_settings(tmp / "lake", stages="ic", mlflow_tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    df = read_curated(Lake.from_settings(settings))
    if sample and len(df) > sample: df = df.sample(sample, random_state=0)
    demo_model(df.text, (df.label == "spam").astype(int), epochs=epochs).save(tmp / "model.keras")
    version = register_champion(settings.mlflow_tracking_uri, tmp / "model.keras", name, experiment="serve-tests",
                                artifacts=tmp / "artifacts")
    return settings, f"models:/{name}@champion", version
