"""``editd serve`` as a real process: edits over HTTP, completions, retraction, restart."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.daemon.service.conftest import DaemonProcess, write_config


def _first(words: list[str]) -> list[str]:
    return [w.strip().split(".")[0].split()[0] if w.strip() else "" for w in words]


def test_serve_applies_retracts_and_survives_restart(
    micro_world: Path,
    world_edits: list[dict[str, Any]],
    tmp_path: Path,
    daemon_factory: list[DaemonProcess],
) -> None:
    config = write_config(tmp_path, micro_world)
    edits = [dict(e) for e in world_edits[:6]]
    for e in edits[3:]:
        e["backend"] = "melo"  # the first three go "auto": subject + short target -> hook
    prompts = [e["prompt"] for e in edits]
    targets = [e["target"].strip() for e in edits]

    daemon = DaemonProcess(config)
    daemon_factory.append(daemon)
    daemon.start()
    before = daemon.complete(prompts)
    assert _first(before) != targets  # the base model answers the old facts

    ids = daemon.submit(edits)
    assert ids == [e["id"] for e in edits]
    states = daemon.wait_settled(ids)
    assert set(states.values()) == {"applied"}, states
    backends = [daemon.edit(i)["backend"] for i in ids]
    assert backends == ["hook"] * 3 + ["melo"] * 3
    assert daemon.edit(ids[0])["result"]["verification"]["passed"] is True
    after = daemon.complete(prompts)
    assert [t.split()[0] for t in _first(after)] == [t.split()[0] for t in targets]

    # retract one edit of each back-end: those prompts answer as the base model did
    for victim in (ids[1], ids[4]):
        r = daemon.request("DELETE", f"/v1/edits/{victim}")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "retracted"
    retracted = daemon.complete([prompts[1], prompts[4]])
    assert retracted == [before[1], before[4]]

    status = daemon.request("GET", "/v1/status").json()
    assert status["applied_by_backend"] == {"hook": 2, "melo": 2}
    metrics = daemon.request("GET", "/metrics").text
    assert "editd_queue_depth" in metrics

    assert daemon.terminate() == 0  # SIGTERM: finish, checkpoint, exit 0
    assert "checkpoint_created" in daemon.tail(200)

    again = DaemonProcess(config)
    daemon_factory.append(again)
    again.start()
    assert again.complete(prompts) == daemon_complete_expected(after, before)
    assert again.edit(ids[1])["status"] == "retracted"
    restore = again.request("GET", "/v1/status").json()["restore"]
    assert restore["checkpoint_id"] is not None
    assert restore["from_checkpoint"] == 4
    assert again.terminate() == 0


def daemon_complete_expected(after: list[str], before: list[str]) -> list[str]:
    """After the restart: the edited answers, with the two retracted prompts back to base."""
    out = list(after)
    out[1], out[4] = before[1], before[4]
    return out


def test_serve_refuses_a_public_address_without_a_token(micro_world: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, micro_world)
    cmd = [sys.executable, "-m", "daemon.cli", "--config", str(config), "serve"]
    done = subprocess.run(
        [*cmd, "--host", "0.0.0.0", "--port", "0"], capture_output=True, timeout=120
    )
    assert done.returncode == 1
    assert b"not a loopback address" in done.stderr


def _loading_daemon(
    tmp_path: Path, micro_world: Path, daemon_factory: list[DaemonProcess]
) -> DaemonProcess:
    """``editd serve`` started and waited for until its port is bound (the model loads next)."""
    daemon = DaemonProcess(write_config(tmp_path, micro_world))
    daemon_factory.append(daemon)
    daemon.start(wait=False)
    deadline = time.monotonic() + 60
    while not daemon.port_file.is_file() and time.monotonic() < deadline:
        time.sleep(0.02)
    return daemon


def test_second_sigterm_exits_at_once(
    micro_world: Path, tmp_path: Path, daemon_factory: list[DaemonProcess]
) -> None:
    daemon = _loading_daemon(tmp_path, micro_world, daemon_factory)
    assert daemon.proc is not None
    # while it is still loading, two SIGTERMs: the second exits without waiting
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=60) in (0, 1)


def test_one_sigterm_during_start_up_abandons_it(
    micro_world: Path, tmp_path: Path, daemon_factory: list[DaemonProcess]
) -> None:
    """A first start may spend minutes on locate and key statistics: one SIGTERM then
    stops the process at once (exit 0), without building the rest or serving."""
    daemon = _loading_daemon(tmp_path, micro_world, daemon_factory)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)  # the port is bound: the model is loading
    assert daemon.proc.wait(timeout=60) == 0
    events = [json.loads(x) for x in daemon.log_path.read_text().splitlines() if x[:1] == "{"]
    names = [e["event"] for e in events]
    assert "daemon_ready" not in names and "serving" not in names, names
    assert "startup_abandoned" in names and "daemon_stopped" in names
    stop = next(e for e in events if e["event"] == "stop_requested")
    assert stop["starting"] is True
    daemon.start()  # the store's lock was released: the next start gets it and serves
    assert daemon.request("GET", "/healthz").status_code == 200


def test_systemd_notifications_sighup_reload_and_cli_verbs(
    micro_world: Path,
    world_edits: list[dict[str, Any]],
    tmp_path: Path,
    daemon_factory: list[DaemonProcess],
) -> None:
    import json
    import socket
    import time

    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(0.2)
    config = write_config(
        tmp_path, micro_world, drift={"enabled": True}, router={"default_backend": "melo"}
    )
    daemon = DaemonProcess(config, extra_env={"NOTIFY_SOCKET": str(notify_path)})
    daemon_factory.append(daemon)
    daemon.start()

    def messages() -> list[str]:
        out = []
        while True:
            try:
                out.append(listener.recv(4096).decode())
            except TimeoutError:
                return out

    seen = messages()
    assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in seen), seen
    assert "READY=1" in seen

    ids = daemon.submit([dict(e) for e in world_edits[:3]])
    assert set(daemon.wait_settled(ids).values()) == {"applied"}

    def editd(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "daemon.cli", "--config", str(config), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=daemon.env)

    config.write_text(
        config.read_text().replace("[api]\n", "") + f"\n[api]\nport = {daemon.port}\n",
        encoding="utf-8",
    )
    probe = editd("probe", "--json")
    assert probe.returncode == 0, probe.stderr
    report = json.loads(probe.stdout)
    assert report["passed"] is True and report["top1_agreement"] == 1.0
    created = editd("checkpoint", "create", "--json")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["edit_count"] == 3
    retract = editd("edits", "retract", ids[0])
    assert retract.returncode == 0, retract.stderr
    assert daemon.edit(ids[0])["status"] == "retracted"

    # SIGHUP: the worker's batch size is reloadable
    config.write_text(config.read_text() + "\n", encoding="utf-8")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    reload_seen: list[str] = []
    while time.monotonic() < deadline and not any("RELOADING=1" in m for m in reload_seen):
        reload_seen += messages()
    assert any("RELOADING=1" in m for m in reload_seen), reload_seen
    assert "config_reloaded" in daemon.tail(400)

    assert daemon.terminate() == 0
    assert "STOPPING=1" in messages()
    listener.close()
