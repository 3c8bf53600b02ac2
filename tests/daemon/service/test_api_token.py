"""``editd serve`` with an API token: reads need it, and SIGHUP rotates it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.daemon.service.conftest import DaemonProcess, write_config

OLD = "old-token-0123456789abcdef"
NEW = "new-token-0123456789abcdef"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_sighup_rotates_the_api_token(
    micro_world: Path, tmp_path: Path, daemon_factory: list[DaemonProcess]
) -> None:
    """After ``kill -HUP`` with a new token in the file, the old token is refused and the
    new one (also through the CLI) is accepted, without a restart."""
    config = write_config(tmp_path, micro_world, api={"token": OLD})
    daemon = DaemonProcess(config)
    daemon_factory.append(daemon)
    daemon.start()
    assert daemon.request("GET", "/v1/status").status_code == 401
    assert daemon.request("GET", "/v1/status", headers=bearer(OLD)).status_code == 200

    text = config.read_text(encoding="utf-8")  # the CLI below needs the bound port too
    config.write_text(text.replace(f'"{OLD}"', f'"{NEW}"\nport = {daemon.port}'), "utf-8")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while "api_settings_reloaded" not in daemon.tail(400):
        assert time.monotonic() < deadline, daemon.tail()
        time.sleep(0.1)

    assert daemon.request("GET", "/v1/status", headers=bearer(OLD)).status_code == 401
    assert daemon.request("GET", "/v1/status", headers=bearer(NEW)).status_code == 200
    cli = [sys.executable, "-m", "daemon.cli", "--config", str(config)]
    created = subprocess.run(
        [*cli, "checkpoint", "create", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=daemon.env,
    )
    assert created.returncode == 0, created.stderr
    assert daemon.terminate() == 0
