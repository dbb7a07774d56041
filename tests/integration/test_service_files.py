"""The systemd unit passes systemd-analyze and keeps its hardening."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.harness.programs import require_program

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = require_program("systemd-analyze", "systemd")
    # The unit names /opt/mta; point it at this checkout so the paths exist.
    unit = tmp_path / "mta.service"
    unit.write_text((ROOT / "etc/systemd/mta.service").read_text().replace("/opt/mta", str(ROOT)))
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    text = unit.read_text()
    for hardening in ("User=mta", "NoNewPrivileges=yes", "ProtectSystem=strict", "-HUP"):
        assert hardening in text
