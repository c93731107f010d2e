"""Pieces shared by tests (and benchmarks) that start a real Ray Serve API: a lake with curated data, a small
model registered as the champion, waiting for readiness, reading Ray's metrics endpoint, finding the serving
processes. A plain module, not a conftest: `from serve_helpers import ...` (tests/integration is on sys.path
under pytest's rootdir-relative imports)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import requests

SPAM_TEXT = "WINNER!! You have been selected to receive a £900 prize reward! To claim call 09061701461."


def corpus_path() -> str:
    "The SMS corpus: SPAM_MLOPS_SOURCE, else the shared copy beside the repo."
    root = Path(__file__).resolve().parents[2]
    for p in (os.environ.get("SPAM_MLOPS_SOURCE"), "/work/shared/data/SMSSpamCollection",
              root.parent / "shared" / "data" / "SMSSpamCollection"):
        if p and Path(p).is_file(): return str(p)
    raise FileNotFoundError("no SMS corpus: set SPAM_MLOPS_SOURCE")


def register(tracking_uri: str, keras_file: Path, name: str) -> str:
    "Log `keras_file` as a pyfunc model, register it under `name`, move the champion alias to it; the version."
    import mlflow
    from mlflow.pyfunc import PythonModel

    class KerasModel(PythonModel):
        def load_context(self, context):
            import keras
            self.model = keras.saving.load_model(context.artifacts["keras_model"])

        def predict(self, context, model_input):
            import tensorflow as tf
            return self.model(tf.constant([[t] for t in model_input.iloc[:, 0]])).numpy().ravel()

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)  # a registry URI set earlier in this process (train) would win otherwise
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=KerasModel(),
                                       artifacts={"keras_model": str(keras_file)}, registered_model_name=name)
    version = str(info.registered_model_version)
    mlflow.MlflowClient(tracking_uri, tracking_uri).set_registered_model_alias(name, "champion", version)
    return version


def champion(tmp: Path, epochs: int = 1, sample: int | None = 2000, name: str = "spam_detection"):
    """Ingest and curate the corpus into a lake under `tmp`, fit a small demo LSTM (quality is not the point of
    a fault test: `sample` messages, `epochs` epochs), register it as the champion of `name` in a SQLite
    registry under `tmp`. Returns (settings, model URI, version)."""
    import mlflow

    from spam_mlops import serve as sv
    from spam_mlops.config import get_settings
    from spam_mlops.curate import curate, read_curated
    from spam_mlops.ingest import ingest
    from spam_mlops.lake import Lake

    settings = get_settings(lake=str(tmp / "lake"), source=corpus_path(), mlflow_tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    ingest(settings); curate(settings)
    df = read_curated(Lake.from_settings(settings))
    if sample and len(df) > sample: df = df.sample(sample, random_state=0)
    sv.build_demo_model(df.text, (df.label == "spam").astype(int), epochs=epochs).save(tmp / "model.keras")
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("serve-faults", artifact_location=str(tmp / "artifacts")))
    version = register(settings.mlflow_tracking_uri, tmp / "model.keras", name)
    return settings, f"models:/{name}@champion", version


def wait_ready(url: str, timeout: float = 240) -> float:
    "Wait until `url`/readyz answers 200; seconds waited. Raises TimeoutError."
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200: return time.monotonic() - start
        except requests.RequestException: pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready in {timeout} s")


def scrape(metrics_url: str, name: str) -> dict[str, float]:
    "Series of metric `name` from Ray's metrics endpoint, keyed by their label text (summed over duplicates)."
    out: dict[str, float] = {}
    for line in requests.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, value = line.rsplit(" ", 1)
            out[labels] = out.get(labels, 0.0) + float(value)
    return out


def total(series: dict[str, float], **labels) -> float:
    "Sum of the series whose labels include all of `labels`."
    return sum(v for k, v in series.items() if all(f'{n}="{x}"' in k for n, x in labels.items()))


def wait_metric(metrics_url: str, name: str, pred, timeout: float = 60) -> dict[str, float]:
    "Poll metric `name` until `pred(series)` holds; the series. Raises AssertionError after `timeout` s."
    end, s = time.monotonic() + timeout, {}
    while time.monotonic() < end:
        s = scrape(metrics_url, name)
        if pred(s): return s
        time.sleep(1)
    raise AssertionError(f"{name} did not reach the expected value in {timeout} s: {s}")


def serving_processes(app: str = "spam_api", deployment: str = "SpamAPI") -> dict[str, list]:
    """The processes of this driver's Ray session that serve traffic, by role: `replica` (the deployment's
    replica actors), `haproxy` (the HAProxy ingress), `proxy` (Serve's proxy actor), `controller`.
    Found among this process's descendants (Ray started in-process), so another Ray on the machine is never
    touched. Values are psutil.Process lists."""
    import psutil
    roles: dict[str, list] = {"replica": [], "haproxy": [], "proxy": [], "controller": []}
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try: cmd = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess): continue
        if f"ServeReplica:{app}:{deployment}" in cmd: roles["replica"].append(p)
        elif "haproxy" in p.name() or cmd.split(" ", 1)[0].endswith("haproxy"): roles["haproxy"].append(p)
        elif "ProxyActor" in cmd: roles["proxy"].append(p)
        elif "ServeController" in cmd: roles["controller"].append(p)
    return roles


def replica_states(app: str = "spam_api", deployment: str = "SpamAPI") -> dict[str, int]:
    "Replica counts by state (RUNNING, STARTING, ...) from `serve.status()`."
    from ray import serve
    try: d = serve.status().applications[app].deployments[deployment]
    except KeyError: return {}
    return {str(getattr(k, "value", k)): n for k, n in d.replica_states.items()}
