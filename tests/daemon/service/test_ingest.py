"""Feeds and the nightly run through a real ``editd serve`` process.

A feed on a live HTTP server (127.0.0.1) is added with ``editd feeds add`` while the
daemon runs; its scheduler polls it and the worker applies the items' edits; an
item that turns into ``op: retract`` makes the live model forget (``editd feeds
poll`` goes through the daemon). ``schedule: nightly`` edits wait until ``editd
nightly`` (what the systemd timer runs) starts the daemon's nightly run, which also
imports the spool, applies everything, validates drift and records a summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.daemon.feeds.conftest import FeedServer, Reply, feed_server  # noqa: F401
from tests.daemon.service.conftest import DaemonProcess, write_config


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDITD_CONFIG": str(config)}
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def point_cli_at(config: Path, daemon: DaemonProcess) -> None:
    """The daemon listens on a free port: tell the CLI (which reads the config) where."""
    text = config.read_text(encoding="utf-8")
    config.write_text(text + f"\n[api]\nport = {daemon.port}\n", encoding="utf-8")


def jsonfeed(items: list[dict[str, Any]]) -> bytes:
    doc = {"version": "https://jsonfeed.org/version/1.1", "title": "facts", "items": items}
    return json.dumps(doc).encode()


def wait_for(check: Any, timeout: float = 120.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_feed_items_are_applied_and_retracted_through_the_live_daemon(
    micro_world: Path,
    world_edits: list[dict[str, Any]],
    tmp_path: Path,
    daemon_factory: list[DaemonProcess],
    feed_server: FeedServer,  # noqa: F811
) -> None:
    edits = [{**e, "backend": "melo"} for e in world_edits[:3]]
    items: list[dict[str, Any]] = [
        {"id": f"item-{n}", "title": "t", "_fact_edit": e} for n, e in enumerate(edits)
    ]
    feed_server.route("/facts.json", Reply(body=jsonfeed(items), etag='"1"'))
    config = write_config(
        tmp_path, micro_world, feeds={"tick_s": 0.3, "allow_hosts": ["127.0.0.1"]}
    )
    daemon = DaemonProcess(config)
    daemon_factory.append(daemon)
    daemon.start()
    point_cli_at(config, daemon)
    before = daemon.complete([e["prompt"] for e in edits])

    added = cli(
        config, "feeds", "add", "facts", feed_server.url("/facts.json"), "--interval", "600"
    )
    assert added.returncode == 0, added.stderr
    ids = [e["id"] for e in edits]
    wait_for(lambda: all(daemon.edit_or_none(i) for i in ids), what="the feed's edits")
    states = daemon.wait_settled(ids)
    assert set(states.values()) == {"applied"}, states
    record = daemon.edit(ids[0])
    assert record["request"]["source"] == {
        "kind": "feed",
        "url": feed_server.url("/facts.json"),
        "item_id": "item-0",
    }
    after = daemon.complete([e["prompt"] for e in edits])
    first_words = [a.split()[0].rstrip(".,") for a in after]
    assert first_words == [e["target"].split()[0] for e in edits], after

    # The publisher withdraws item 0: the next poll retracts it from the live model.
    items[0]["_fact_edit"] = {**items[0]["_fact_edit"], "op": "retract"}
    feed_server.route("/facts.json", Reply(body=jsonfeed(items), etag='"2"'))
    polled = cli(config, "feeds", "poll", "facts", "--json")
    assert polled.returncode == 0, polled.stderr
    (report,) = json.loads(polled.stdout)
    assert (report["outcome"], report["retracted"]) == ("ok", [ids[0]])
    assert daemon.edit(ids[0])["status"] == "retracted"
    assert daemon.complete([edits[0]["prompt"]]) == [before[0]]

    # A second poll with the same ETag is a 304 and changes nothing.
    again = json.loads(cli(config, "feeds", "poll", "facts", "--json").stdout)
    assert again[0]["outcome"] == "not_modified"
    listed = json.loads(cli(config, "feeds", "list", "--json").stdout)
    assert [(f["name"], f["status"], f["items"], f["edits"]) for f in listed] == [
        ("facts", "active", 3, 2)
    ]
    assert daemon.terminate() == 0


def test_nightly_run_holds_releases_imports_and_validates(
    micro_world: Path,
    world_edits: list[dict[str, Any]],
    tmp_path: Path,
    daemon_factory: list[DaemonProcess],
) -> None:
    spool = tmp_path / "spool"
    config = write_config(
        tmp_path,
        micro_world,
        feeds={"spool_dir": str(spool), "enabled": False},
        scheduler={"nightly_enabled": False},
        drift={"enabled": True, "every_batches": 1000, "interval_minutes": 600.0},
    )
    daemon = DaemonProcess(config)
    daemon_factory.append(daemon)
    daemon.start()
    point_cli_at(config, daemon)
    held = {**world_edits[10], "backend": "melo", "schedule": "nightly"}
    (held_id,) = daemon.submit([held])
    time.sleep(2.0)  # the worker polls every 0.05 s: a "now" edit would be applied by now
    assert daemon.edit(held_id)["status"] == "queued"

    incoming = spool / "incoming"
    incoming.mkdir(parents=True)
    lines = [json.dumps({**e, "backend": "melo"}) for e in world_edits[11:13]]
    lines.insert(1, json.dumps({"prompt": "", "target": " nothing"}))
    (incoming / "drop.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    started = cli(config, "nightly", "--json")
    assert started.returncode == 0, started.stderr
    assert json.loads(started.stdout)["started"] is True

    def finished() -> dict[str, Any] | None:
        run = daemon.request("GET", "/v1/status").json().get("last_nightly")
        return run if run and run["status"] != "running" else None

    run = wait_for(finished, timeout=300, what="the nightly run")
    summary = run["summary"]
    assert run["status"] == "done", run
    assert (summary["released"], summary["accepted"], summary["rejected"]) == (1, 2, 1)
    assert summary["pending"] == 0
    assert summary["drift"]["status"] == "passed", summary["drift"]
    ids = [held_id, world_edits[11]["id"], world_edits[12]["id"]]
    assert {daemon.edit(i)["status"] for i in ids} == {"applied"}
    assert not list(incoming.iterdir())
    assert (spool / "processed" / "drop.jsonl").exists()
    report = json.loads((spool / "processed" / "drop.jsonl.report.json").read_text())
    assert (report["accepted"], report["rejected"]) == (2, 1)
    assert report["rejected_lines"][0]["line"] == 2
    assert daemon.terminate() == 0
