"""Alerts that reach someone: a real Prometheus evaluating the project's rules (monitoring/alert-rules.yaml, as
written) on a target the test controls, a real Alertmanager running the project's configuration
(monitoring/alertmanager.yml) with only the receiver's address and token file pointed at this test, and a webhook
receiver here that records what arrives.

The target serves the kube-state-metrics series of a failed `mlflow-backup` run (kube_job_failed and kube_job_owner,
the labels kube-state-metrics gives them); SpamCronJobFailed has no `for:`, so the real rule fires as written.
Overridden for speed, and only in the test's copies of the configurations: scrape and evaluation every second, and
Alertmanager's group_wait / group_interval (30 s / 5 min in production) to 1 s.
"""
from __future__ import annotations

import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from support import ROOT, alertmanager_server, free_port, prom_query, prometheus_server, wait_until

pytestmark = pytest.mark.integration

MON = ROOT / "monitoring"
RULES = MON / "alert-rules.yaml"
BACKUP_JOB = {"namespace": "spam-mlops", "job_name": "mlflow-backup-29140"}


class Receiver:
    "A webhook receiver on 127.0.0.1: every POST's headers and JSON body, in order of arrival."

    def __init__(self):
        self.posts: list[tuple[dict, dict]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.posts.append((dict(self.headers), json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args): pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def alerts(self, alertname: str, status: str) -> list[tuple[dict, dict]]:
        "(headers, alert) of every received alert with that name and status."
        return [(h, a) for h, body in self.posts for a in body["alerts"]
                if a["labels"].get("alertname") == alertname and a["status"] == status]


@pytest.fixture
def job_state():
    "The target: kube-state-metrics' series of the backup CronJob's last Job (not failed yet); yields the gauges."
    from prometheus_client import CollectorRegistry, Gauge, start_http_server
    reg = CollectorRegistry()
    failed = Gauge("kube_job_failed", "job failed condition", ["namespace", "job_name", "condition"], registry=reg)
    owner = Gauge("kube_job_owner", "job owner", ["namespace", "job_name", "owner_kind", "owner_name",
                                                  "owner_is_controller"], registry=reg)
    owner.labels(**BACKUP_JOB, owner_kind="CronJob", owner_name="mlflow-backup", owner_is_controller="true").set(1)
    failed.labels(**BACKUP_JOB, condition="true").set(0)
    failed.labels(**BACKUP_JOB, condition="false").set(1)
    port = free_port()
    server, _ = start_http_server(port, addr="127.0.0.1", registry=reg)
    yield port, failed
    server.shutdown()


def test_a_failed_backup_reaches_the_webhook_with_its_runbook(job_state, tmp_path):
    port, failed = job_state
    rule = next(r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
                if r.get("alert") == "SpamCronJobFailed")
    assert "for" not in rule  # fires as written, at the first evaluation that sees the failure
    token = secrets.token_hex(16)
    (tmp_path / "token").write_text(token)
    am_cfg = yaml.safe_load((MON / "alertmanager.yml").read_text())
    with Receiver() as receiver:
        # the project's Alertmanager configuration; only where it sends, the token file and the timings change
        (hook,) = next(r for r in am_cfg["receivers"] if r["name"] == am_cfg["route"]["receiver"])["webhook_configs"]
        hook["url"] = receiver.url
        hook["http_config"]["authorization"]["credentials_file"] = str(tmp_path / "token")
        am_cfg["route"].update(group_wait="1s", group_interval="1s")
        with alertmanager_server(tmp_path / "alertmanager", am_cfg) as am:
            prom_cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                        "rule_files": [str(RULES)],
                        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [am.url.split("//")[1]]}]}]},
                        "scrape_configs": [{"job_name": "kube-state-metrics", "honor_labels": True,
                                            "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}]}
            with prometheus_server(tmp_path / "prometheus", prom_cfg) as prom:
                wait_until(lambda: prom_query(prom.url, 'up{job="kube-state-metrics"} == 1'), 30, "the target scraped")
                assert prom_query(prom.url, 'ALERTS{alertname="SpamCronJobFailed"}') == []
                assert receiver.alerts("SpamCronJobFailed", "firing") == []

                # the backup's Job fails
                failed.labels(**BACKUP_JOB, condition="true").set(1)
                failed.labels(**BACKUP_JOB, condition="false").set(0)
                try:
                    wait_until(lambda: receiver.alerts("SpamCronJobFailed", "firing"), 40, "the alert at the webhook")
                except TimeoutError as e:
                    pytest.fail(f"{e}\nalertmanager:\n{am.log_tail(1500)}\nprometheus:\n{prom.log_tail(1500)}")
                headers, alert = receiver.alerts("SpamCronJobFailed", "firing")[0]
                assert headers["Authorization"] == f"Bearer {token}"  # the Secret's credential reached the receiver
                assert {k: alert["labels"].get(k) for k in ("alertname", "severity", "owner_name", "job_name",
                                                            "namespace")} == {
                    "alertname": "SpamCronJobFailed", "severity": "warning", "owner_name": "mlflow-backup",
                    "job_name": "mlflow-backup-29140", "namespace": "spam-mlops"}
                assert alert["annotations"]["runbook_url"] == rule["annotations"]["runbook_url"]
                runbook = alert["annotations"]["runbook_url"]
                assert runbook.endswith("/explanations/runbook.html#alert-spamcronjobfailed")
                assert alert["annotations"]["summary"] == "CronJob mlflow-backup: Job mlflow-backup-29140 failed"
                body = next(b for _, b in receiver.posts if alert in b["alerts"])
                assert body["receiver"] == "oncall" and body["status"] == "firing"

                # the failed Job is deleted once handled: the series go, the receiver is told it is resolved
                failed.remove(*BACKUP_JOB.values(), "true")
                resolved = wait_until(lambda: receiver.alerts("SpamCronJobFailed", "resolved"), 40,
                                      "the resolution at the webhook")
                assert resolved[0][1]["labels"]["job_name"] == BACKUP_JOB["job_name"]

