"""Data the tests share: the SMS corpus (found through Settings, no absolute path), a lake with the pipeline
run, and statements on the local PostgreSQL."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout
SHARED_CORPUS = ROOT.parent / "shared" / "data" / "SMSSpamCollection"  # beside the checkout


def corpus_path() -> Path:
    """The SMS Spam Collection on disk: Settings' `source` (SPAM_MLOPS_SOURCE) when it is a local path, else
    ../shared/data/SMSSpamCollection beside the checkout. FileNotFoundError naming what was tried."""
    from spam_mlops.config import get_settings
    source = get_settings().source
    path = SHARED_CORPUS if "://" in source else Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"SMS corpus not found at {path}: set SPAM_MLOPS_SOURCE to the SMSSpamCollection file")
    return path.resolve()


def pipeline_settings(lake: Path, source: Path | None = None, stages: str = "icf", **overrides):
    """Settings of a local lake at `lake` on the corpus (or `source`), with the stages run: i(ngest), c(urate),
    f(eatures). `overrides` go to get_settings (mlflow_tracking_uri=..., ...)."""
    from spam_mlops.config import get_settings
    from spam_mlops.curate import curate
    from spam_mlops.features import features
    from spam_mlops.ingest import ingest
    settings = get_settings(lake=str(lake), source=str(source or corpus_path()), **overrides)
    for key, stage in (("i", ingest), ("c", curate), ("f", features)):
        if key in stages: stage(settings)
    return settings


PG = dict(host="127.0.0.1", port=5432, user="postgres")


def pg_exec(sql: str, dbname: str = "postgres"):
    "Run one statement on the local PostgreSQL (trust auth), autocommit; return all rows if any."
    import psycopg2
    con = psycopg2.connect(dbname=dbname, **PG)
    con.autocommit = True
    try:
        with con.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description else None
    finally:
        con.close()


def feature_repo_copy(dest: Path) -> str:
    "A private copy of feature_repo/ at `dest` (same YAML, overlay and definitions; its own registry and SQLite)."
    import shutil
    shutil.copytree(ROOT / "feature_repo", dest, ignore=shutil.ignore_patterns("data", "__pycache__"))
    return str(dest)
