"""The `spam-mlops` command as a user runs it: stages, papermill runs kept in the lake, clear failures, and the
package built as a wheel and installed into a fresh virtualenv."""
from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from spam_mlops.cli import QUIET_ENV

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "spam-mlops")


# what a user's shell does not set, but this test process may have picked up from a library it imported
# (Ray's `try_import_tf` sets TF_CPP_MIN_LOG_LEVEL=3 in its process when it finds it unset)
LEAKED = (*QUIET_ENV, "TF_ENABLE_ONEDNN_OPTS")


def _cli(*args, env=None, cwd=ROOT):
    user = {k: v for k, v in os.environ.items() if k not in LEAKED}
    return subprocess.run([CLI, *args], capture_output=True, text=True, env={**user, **(env or {})},
                          cwd=cwd, timeout=600)


@pytest.fixture
def lake_env(tmp_path, corpus):
    return {"SPAM_MLOPS_LAKE": str(tmp_path / "lake"), "SPAM_MLOPS_SOURCE": str(corpus)}


def test_stages_from_the_command_line(lake_env):
    out = [_cli(stage, env=lake_env) for stage in ("ingest", "curate", "features")]
    assert [r.returncode for r in out] == [0, 0, 0], [r.stderr for r in out]
    # the 403 repeated lines are one message each: ingest drops them, curate and features see 5171 messages
    assert "5574 accepted, 0 refused; 5171 new rows, 403 repeats" in out[0].stdout
    assert "5171 new rows (raw v0 → curated v0)" in out[1].stdout and "5171 rows out" in out[1].stdout
    assert "5171 new rows from curated v0; 5171 rows" in out[2].stdout
    again = [_cli(stage, env=lake_env) for stage in ("ingest", "curate", "features")]
    assert all(r.returncode == 0 and "0 new rows" in r.stdout for r in again), [r.stdout for r in again]


def test_papermill_runs_are_kept_in_the_lake(lake_env):
    for nb in ("00_ingest", "01_curate", "02_features"):
        r = _cli("run", nb, env=lake_env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "succeeded" in r.stdout
    runs = sorted(p.name for p in (Path(lake_env["SPAM_MLOPS_LAKE"]) / "runs").iterdir())
    assert [r.split("-", 1)[1] for r in runs] == ["00_ingest.ipynb", "01_curate.ipynb", "02_features.ipynb"]
    assert (Path(lake_env["SPAM_MLOPS_LAKE"]) / "features" / "nlp_features.parquet").exists()


def test_failures_are_one_clear_line(tmp_path, lake_env):
    r = _cli("ingest", env={**lake_env, "SPAM_MLOPS_SOURCE": str(tmp_path / "missing.txt")})
    assert r.returncode == 1 and r.stderr.strip() == f"error: source not found: {tmp_path / 'missing.txt'}"
    r = _cli("curate", env={**lake_env, "SPAM_MLOPS_LAKE": str(tmp_path / "empty")})
    assert r.returncode == 1 and "not found" in r.stderr and "Traceback" not in r.stderr
    r = _cli("ingest", env={**lake_env, "SPAM_MLOPS_LAKE": "ftp://x"})
    assert r.returncode == 1 and "SPAM_MLOPS_LAKE" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ham\tok\nnot a message\n")
    r = _cli("run", "00_ingest", "-p", "SOURCE", str(bad), env=lake_env)
    assert r.returncode == 0 and "succeeded" in r.stdout  # one line refused, quarantined, the run succeeds
    r = _cli("run", "00_ingest", "-p", "SOURCE", str(tmp_path / "none"), env=lake_env)
    assert r.returncode == 1 and "IngestError" in r.stderr and "-FAILED.ipynb" in r.stderr


NOISE = ("oneDNN", "absl::InitializeLog", "cpu_feature_guard", "Started a local Ray instance", "Token authentication",
         "INFO mlflow", "WARNING mlflow", "Warning", "Downloading artifacts")


@pytest.mark.timeout(900)
def test_the_console_is_quiet_unless_verbose(lake_env, tmp_path):
    """`spam-mlops train` prints its result line without the start-up logs of TensorFlow, absl, Ray and MLflow;
    `spam-mlops -v` shows them."""
    env = lake_env | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    assert [_cli(stage, env=env).returncode for stage in ("ingest", "curate", "features")] == [0, 0, 0]
    args = ("train", "--sample", "600", "--epochs", "1", "--features-source", "lake")
    quiet = _cli(*args, "--workers", "1", env=env)  # Ray Train: Ray's start-up lines too
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert quiet.stdout.strip().splitlines()[-1].startswith("train: run ")
    print(f"\nquiet train: {len(quiet.stdout.splitlines())} line(s) on stdout, {len(quiet.stderr.splitlines())} on "
          f"stderr: {quiet.stderr!r}")
    assert not [n for n in NOISE if n in quiet.stderr], quiet.stderr
    verbose = _cli("-v", *args, "--workers", "0", env=env)  # in-process: TensorFlow's and MLflow's lines
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    tf_lines = ("oneDNN", "cpu_feature_guard")  # which one TensorFlow prints depends on the CPU
    assert any(n in verbose.stderr for n in tf_lines) and "mlflow" in verbose.stderr, verbose.stderr


def test_wheel_installs_into_a_fresh_virtualenv(tmp_path):
    "Build the wheel, install it alone into a new venv (dependencies shared read-only), run the CLI there."
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("spam_mlops-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    where_pandas = "import pandas, os; print(os.path.dirname(os.path.dirname(pandas.__file__)))"
    deps = subprocess.run([sys.executable, "-c", where_pandas], capture_output=True, text=True,
                          check=True).stdout.strip()
    Path(site, "shared_deps.pth").write_text(deps + "\n")  # a plain path: the dev venv's editable hook stays off
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300)
    where = subprocess.run([str(py), "-c", "import spam_mlops; print(spam_mlops.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert where.startswith(site), where
    r = subprocess.run([str(env_dir / "bin" / "spam-mlops"), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "ingest" in r.stdout and "curate" in r.stdout
