"""The suite's conftest: loads the plugin in tests/support (fixtures corpus, s3_server, s3_env, pipeline_lake,
mlflow_sqlite_server, mlflow_pg_server; kind markers). Helpers are imported from `support`; the names below stay
importable from conftest for the test files that still do `from conftest import ...`."""
from __future__ import annotations

from support import IN_CI, free_port, pg_exec, require, wait_http  # noqa: F401

pytest_plugins = ["support.plugin"]
