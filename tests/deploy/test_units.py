"""The systemd units verify (systemd-analyze) and run editd the way its verbs expect."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "editd.service"
UNITS = ("editd.service", "editd-nightly.service", "editd-nightly.timer")
# systemd-analyze security's overall exposure (0 safest, 10 worst) each unit must stay within
EXPOSURE_BOUNDS = {"editd.service": 3.5, "editd-nightly.service": 2.5}
# what CUDA cannot run under (see the comments in editd.service)
CUDA_BREAKERS = {
    "PrivateDevices": "yes",
    "ProcSubset": "pid",
    "PrivateUsers": "yes",
    "MemoryDenyWriteExecute": "yes",
}


def _unit(name: str = "editd.service") -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / name)
    return parser


def _values(name: str, section: str, key: str) -> list[str]:
    """Every value of a key that may repeat (configparser keeps only the last one)."""
    found, current = [], None
    for line in (DEPLOY / name).read_text(encoding="utf-8").splitlines():
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line.split("=", 1)[0].strip() == key:
            found.append(line.split("=", 1)[1].strip())
    return found


def test_service_is_a_notify_unit_with_a_watchdog_and_a_state_directory() -> None:
    service = _unit()["Service"]
    assert service["Type"] == "notify"
    assert "serve" in service["ExecStart"].split()
    assert service["ExecReload"].endswith("-HUP $MAINPID")
    assert int(service["WatchdogSec"]) > 0
    assert service["StateDirectory"] == "editd"
    assert service["NoNewPrivileges"] == "yes"
    assert "MemoryDenyWriteExecute" not in service


def test_nightly_timer_starts_a_oneshot_that_runs_editd_nightly() -> None:
    """The timer's service only asks for the nightly run: no model, no serve."""
    timer = _unit("editd-nightly.timer")
    assert timer["Timer"]["Unit"] == "editd-nightly.service"
    assert timer["Timer"]["Persistent"] == "yes"
    assert timer["Install"]["WantedBy"] == "timers.target"
    service = _unit("editd-nightly.service")["Service"]
    assert service["Type"] == "oneshot"
    args = service["ExecStart"].split()
    assert args[-1] == "nightly" and "serve" not in args
    daemon = _unit()["Service"]
    for key in ("User", "StateDirectory", "WorkingDirectory", "EnvironmentFile"):
        assert service[key] == daemon[key], key  # same user and state as the daemon


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at a real one for the check
    for name in UNITS:
        text = (
            (DEPLOY / name)
            .read_text(encoding="utf-8")
            .replace("/opt/editd/.venv/bin/editd", shutil.which("true") or "/bin/true")
        )
        (tmp_path / name).write_text(text, encoding="utf-8")
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / n) for n in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if any(name in line for name in UNITS)
    ]
    assert done.returncode == 0, done.stdout + done.stderr
    assert not problems, problems  # e.g. "editd.service:12: Unknown key name 'Tpye'"


def test_nightly_unit_never_starts_the_daemon() -> None:
    """A daemon stopped on purpose stays stopped: ordering only, no dependency."""
    unit = _unit("editd-nightly.service")["Unit"]
    for key in ("Wants", "Requires", "Requisite", "BindsTo", "PartOf", "Upholds"):
        assert "editd.service" not in unit.get(key, ""), key
    assert unit["After"] == "editd.service"


def test_units_keep_state_private_and_the_daemon_keeps_its_gpu() -> None:
    for name in ("editd.service", "editd-nightly.service"):
        service = _unit(name)["Service"]
        assert service["UMask"] == "0077", name
        assert service["StateDirectoryMode"] == "0700", name
        assert service["CapabilityBoundingSet"] == "", name
        assert "@system-service" in _values(name, "Service", "SystemCallFilter"), name
    daemon = _unit()["Service"]
    for key, value in CUDA_BREAKERS.items():
        assert daemon.get(key) != value, key
    devices = _values("editd.service", "Service", "DeviceAllow")
    assert daemon["DevicePolicy"] == "closed"
    assert {"/dev/nvidiactl rw", "/dev/nvidia-uvm rw", "char-nvidia-frontend rw"} <= set(devices)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("name", sorted(EXPOSURE_BOUNDS))
def test_systemd_security_exposure_is_within_bounds(name: str) -> None:
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(DEPLOY / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found.group(1)) <= EXPOSURE_BOUNDS[name], done.stdout
