"""Prometheus: the alert rules pass promtool, /metrics passes promtool, and a
real Prometheus server scrapes a running MTA and reads a counter back."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.harness.client import send
from tests.harness.mta import Mta, free_ports
from tests.harness.poll import eventually
from tests.harness.programs import require_program

pytestmark = pytest.mark.integration

RULES = Path(__file__).resolve().parents[2] / "etc" / "prometheus"


def tool(name: str) -> str:
    return require_program(name, "prometheus")


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], input=stdin, capture_output=True, text=True, timeout=60
    )


def test_alert_rules_and_config_pass_promtool() -> None:
    for args in (
        ("check", "rules", str(RULES / "mta-alerts.yml")),
        ("test", "rules", str(RULES / "mta-alerts-test.yml")),
        ("check", "config", str(RULES / "prometheus.yml")),
    ):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


def test_metrics_pass_promtool_and_prometheus_scrapes_them(
    running_mta: Mta, tmp_path: Path
) -> None:
    send(running_mta)
    exposition = running_mta.metrics()
    checked = promtool("check", "metrics", stdin=exposition)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    (port,) = free_ports(1)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: mta\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{running_mta.metrics_port}']}}]\n"
    )
    server = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("wb"),
    )
    try:
        value = query_until(port, "mta_messages_received_total", timeout=30)
        assert value == 1.0
        assert query_until(port, 'up{job="mta"}', timeout=10) == 1.0
    finally:
        server.terminate()
        server.wait(timeout=20)


def query_until(port: int, expression: str, timeout: float) -> float:
    """The value of ``expression`` once Prometheus has scraped it."""
    url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expression)}"

    def result() -> list[Any]:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return list(json.load(response)["data"]["result"])
        except OSError:
            return []  # not listening yet

    [first, *_] = eventually(result, timeout, f"Prometheus never had {expression}", 0.5)
    return float(first["value"][1])


def test_dashboard_queries_only_metrics_the_daemon_exports(running_mta: Mta) -> None:
    dashboard = json.loads((RULES.parent / "grafana" / "mta-dashboard.json").read_text())
    exported = set(re.findall(r"^# TYPE (\w+) (\w+)", running_mta.metrics(), re.M))
    names = {name for name, _ in exported}
    names |= {f"{name}_bucket" for name, kind in exported if kind == "histogram"}
    names |= {f"{name}_total" for name, kind in exported if kind == "counter"}
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bmta_\w+", target["expr"])
    }
    assert used and used <= names, used - names
    alerts = (RULES / "mta-alerts.yml").read_text()
    assert set(re.findall(r"\bmta_\w+", alerts)) <= names
