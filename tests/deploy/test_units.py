"""The systemd unit verifies (systemd-analyze) and runs editd the way serve expects."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "editd.service"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def test_service_is_a_notify_unit_with_a_watchdog_and_a_state_directory() -> None:
    service = _unit()["Service"]
    assert service["Type"] == "notify"
    assert "serve" in service["ExecStart"].split()
    assert service["ExecReload"].endswith("-HUP $MAINPID")
    assert int(service["WatchdogSec"]) > 0
    assert service["StateDirectory"] == "editd"
    assert service["NoNewPrivileges"] == "yes"
    assert "MemoryDenyWriteExecute" not in service


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at a real one for the check
    text = UNIT.read_text(encoding="utf-8").replace(
        "/opt/editd/.venv/bin/editd", shutil.which("true") or "/bin/true"
    )
    unit = tmp_path / "editd.service"
    unit.write_text(text, encoding="utf-8")
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [
        line for line in (done.stdout + done.stderr).splitlines() if "editd.service" in line
    ]
    assert done.returncode == 0, done.stdout + done.stderr
    assert not problems, problems  # e.g. "editd.service:12: Unknown key name 'Tpye'"
