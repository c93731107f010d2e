"""Test support: the helpers every test file shares (import them: `from support import free_port, ManagedServer`;
tests/ is on sys.path under pytest) and the pytest plugin with the shared fixtures (support.plugin, loaded by
tests/conftest.py)."""
from .data import PG, ROOT, SHARED_CORPUS, corpus_path, feature_repo_copy, pg_exec, pipeline_settings
from .models import SPAM_TEXT, demo_model, register_champion, train_champion
from .servers import (
    BIN,
    IN_CI,
    PROMETHEUS_HINT,
    ManagedServer,
    alertmanager_server,
    answers,
    cli_server,
    free_port,
    group_members,
    mlflow_server,
    moto_server,
    prom_query,
    prometheus_server,
    pushgateway_server,
    require,
    tool,
    wait_http,
    wait_until,
    worker_nodes,
)

__all__ = ["BIN", "IN_CI", "PG", "PROMETHEUS_HINT", "ROOT", "SHARED_CORPUS", "SPAM_TEXT", "ManagedServer",
           "alertmanager_server",
           "answers", "cli_server", "corpus_path", "demo_model", "feature_repo_copy", "free_port", "group_members",
           "mlflow_server", "moto_server", "pg_exec", "pipeline_settings", "prom_query", "prometheus_server",
           "pushgateway_server", "register_champion", "require", "tool", "train_champion", "wait_http",
           "wait_until", "worker_nodes"]
