"""``editd serve`` refuses to start on state it does not own: a store another daemon
holds, a port file planted as a link. What it does write under var/ is private."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.daemon.service.conftest import DaemonProcess, write_config

REFUSAL_TIMEOUT_S = 60.0  # well before a model could load: refused at the first step


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in root.rglob("*")}


def test_a_second_serve_on_the_same_store_exits_naming_the_first(
    micro_world: Path, tmp_path: Path, daemon_factory: list[DaemonProcess]
) -> None:
    config = write_config(tmp_path / "a", micro_world)
    first = DaemonProcess(config)
    daemon_factory.append(first)
    first.start()
    assert first.proc is not None
    var = tmp_path / "a" / "var"
    # another folder, another port, the same store and checkpoint folder
    same = {"path": str(var / "editd.sqlite3")}
    other = write_config(
        tmp_path / "b", micro_world, store=same, checkpoints={"dir": str(var / "checkpoints")}
    )
    second = DaemonProcess(other)
    daemon_factory.append(second)
    second.start(wait=False)
    assert second.proc is not None
    assert second.proc.wait(timeout=REFUSAL_TIMEOUT_S) == 1
    said = second.tail()
    assert f"is in use by another editd process (pid {first.proc.pid}, daemon)" in said
    assert "api_listening" not in said and "restored" not in said  # never reached
    assert not second.port_file.exists()
    assert first.request("GET", "/healthz").status_code == 200
    assert first.terminate() == 0  # SIGTERM: shutdown checkpoint, lock released
    modes = _modes(var)
    assert any(name.startswith("checkpoints/ck-") for name in modes), modes
    assert "editd.sqlite3.lock" in modes
    wrong = {
        name: oct(mode)
        for name, mode in modes.items()
        if mode != (0o700 if (var / name).is_dir() else 0o600)
    }
    assert not wrong, wrong  # folders 0700, files 0600 (editd sets umask 077)


def test_serve_refuses_a_port_file_planted_as_a_link(tmp_path: Path) -> None:
    config = write_config(tmp_path, tmp_path / "no-model-needed")
    victim = tmp_path / "victim"
    victim.write_text("keep")
    link = tmp_path / "port"
    link.symlink_to(victim)
    cmd = [sys.executable, "-m", "daemon.cli", "--config", str(config), "serve"]
    done = subprocess.run(
        [*cmd, "--port", "0", "--port-file", str(link)],
        capture_output=True,
        text=True,
        timeout=REFUSAL_TIMEOUT_S,
    )
    assert done.returncode == 1
    assert f"{link} is a symbolic link" in done.stderr
    assert victim.read_text() == "keep"
