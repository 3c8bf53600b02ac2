"""The ``editd`` command: verbs, exit codes, one-line errors, store-backed verbs."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from daemon.cli import cli
from tests.daemon.feeds.conftest import FeedServer, Reply, feed_server  # noqa: F401
from tests.daemon.service.test_instance_lock import hold_in_another_process

DESIGN_VERBS = [
    "serve",
    "submit",
    "status",
    "edits",
    "checkpoint",
    "feeds",
    "locate",
    "nightly",
    "probe",
    "eval",
    "world",
    "model",
    "demo",
]


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "editd.toml"
    path.write_text('[store]\npath = "state/editd.sqlite3"\n')
    return path


def run(config: Path, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    runner = CliRunner()
    result = runner.invoke(cli, ["--config", str(config), *args], input=stdin)
    return result.exit_code, result.stdout, result.stderr


def test_help_lists_every_verb_in_design() -> None:
    out = CliRunner().invoke(cli, ["--help"]).stdout
    listed = re.findall(r"^  (\w+)\s", out, flags=re.MULTILINE)
    assert sorted(listed) == sorted(DESIGN_VERBS)


@pytest.mark.parametrize("verb", DESIGN_VERBS)
def test_every_verb_has_help_text(verb: str) -> None:
    result = CliRunner().invoke(cli, [verb, "--help"])
    assert result.exit_code == 0
    assert len(result.stdout.strip().splitlines()) >= 3


def test_submit_queues_valid_and_stores_rejected_with_reasons(config_file: Path) -> None:
    lines = [
        json.dumps(
            {"id": "e1", "prompt": "The CEO of Acme is", "target": " Jane", "subject": "Acme"}
        ),
        json.dumps({"prompt": "The CEO of Acme is", "target": " Jane", "subject": "Initech"}),
        "{not json",
        json.dumps({"prompt": "", "target": " x"}),
    ]
    data = ("\n".join(lines) + "\n").encode() + b'{"prompt": "\xff\xfe", "target": " y"}\n'
    code, out, err = run(config_file, "submit", "-", stdin=data)
    assert code == 1
    assert "1 accepted, 4 rejected" in out
    assert "field 'subject'" in err
    assert "field 'prompt'" in err
    assert "UTF-8" in err
    code, out, _ = run(config_file, "status", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["edits"]["queued"] == 1
    assert report["edits"]["rejected"] == 4
    assert report["queue_depth"] == 1
    # idempotent: the same id again creates nothing new
    code, out, _ = run(config_file, "submit", "-", stdin=lines[0].encode())
    assert code == 0
    assert "already submitted" in out
    assert json.loads(run(config_file, "status", "--json")[1])["edits"]["queued"] == 1


def test_submit_accepts_a_json_array_and_a_file(config_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "edits.json"
    path.write_text(
        json.dumps([{"prompt": f"Fact {i} is", "target": f" v{i}"} for i in range(3)], indent=2)
    )
    code, out, _ = run(config_file, "submit", str(path))
    assert code == 0, out
    assert "3 accepted, 0 rejected" in out


def test_edits_list_show_and_retract_a_queued_edit(config_file: Path) -> None:
    run(config_file, "submit", "-", stdin=b'{"id": "k1", "prompt": "A is", "target": " B"}')
    code, out, _ = run(config_file, "edits", "list", "--json")
    assert code == 0
    assert [r["id"] for r in json.loads(out)] == ["k1"]
    code, out, _ = run(config_file, "edits", "show", "k1")
    assert json.loads(out)["request"]["target"] == " B"
    code, out, _ = run(config_file, "edits", "retract", "k1")
    assert code == 0
    assert json.loads(run(config_file, "edits", "show", "k1")[1])["status"] == "retracted"
    code, _, err = run(config_file, "edits", "show", "nope")
    assert code == 1
    assert "no edit with id 'nope'" in err


def test_bad_config_is_a_one_line_error_naming_key_and_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[worker]\nbatch_size = -1\n")
    code, _, err = run(bad, "status")
    assert code == 1
    assert err.strip().count("\n") == 0
    assert "worker.batch_size" in err
    assert str(bad) in err


def test_status_on_an_unreadable_store_fails_and_leaves_the_file_alone(tmp_path: Path) -> None:
    store = tmp_path / "not-a-db.sqlite3"
    store.write_bytes(b"this is not sqlite" * 10)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[store]\npath = "{store}"\n')
    before = store.read_bytes()
    code, _, err = run(cfg, "status")
    assert code == 1
    assert str(store) in err
    assert store.read_bytes() == before
    code, _, err = run(cfg, "submit", "-", stdin=b'{"prompt": "A is", "target": " B"}')
    assert code == 1
    assert store.read_bytes() == before


def test_status_without_a_store_says_where_it_looked(config_file: Path) -> None:
    code, _, err = run(config_file, "status")
    assert code == 1
    assert "state/editd.sqlite3" in err


def test_console_script_runs_as_a_real_process(config_file: Path) -> None:
    """The installed entry point, in a subprocess: exit codes reach the shell."""
    env = {**os.environ, "EDITD_CONFIG": str(config_file)}
    cmd = [sys.executable, "-m", "daemon.cli"]
    done = subprocess.run([*cmd, "status"], capture_output=True, env=env, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith(b"editd: error: ")
    done = subprocess.run([*cmd, "--version"], capture_output=True, env=env, timeout=60)
    assert done.returncode == 0
    assert b"editd, version" in done.stdout


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_retract_fallback_refuses_while_another_process_holds_the_store(tmp_path: Path) -> None:
    """No daemon answers, but one holds the store: the store is left alone, exit 1."""
    config = tmp_path / "editd.toml"
    config.write_text(f'[store]\npath = "state/editd.sqlite3"\n[api]\nport = {_closed_port()}\n')
    run(config, "submit", "-", stdin=b'{"id": "k1", "prompt": "A is", "target": " B"}')
    holder = hold_in_another_process(tmp_path / "state" / "editd.sqlite3")
    try:
        code, _, err = run(config, "edits", "retract", "k1")
        assert code == 1
        assert "no daemon answers" in err
        assert f"pid {holder.pid}" in err
        assert json.loads(run(config, "edits", "show", "k1")[1])["status"] == "queued"
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    code, out, _ = run(config, "edits", "retract", "k1")  # nobody holds it now
    assert code == 0, out
    assert json.loads(run(config, "edits", "show", "k1")[1])["status"] == "retracted"


def test_feeds_poll_fallback_refuses_while_another_process_holds_the_store(
    tmp_path: Path,
    feed_server: FeedServer,  # noqa: F811
) -> None:
    """No daemon answers, but one holds the store: the offline poll neither fetches nor
    retracts (the holder may have the edit in its model), exit 1; it runs once freed."""
    config = tmp_path / "editd.toml"
    config.write_text(
        f'[store]\npath = "state/editd.sqlite3"\n[api]\nport = {_closed_port()}\n'
        '[feeds]\nallow_hosts = ["127.0.0.1"]\n'
    )
    fact = {"id": "f1", "prompt": "A is", "target": " B"}
    item = {"id": "item-0", "title": "t", "_fact_edit": fact}
    doc = {"version": "https://jsonfeed.org/version/1.1", "title": "facts", "items": [item]}
    feed_server.route("/facts.json", Reply(body=json.dumps(doc).encode()))
    assert run(config, "feeds", "add", "facts", feed_server.url("/facts.json"))[0] == 0
    code, out, err = run(config, "feeds", "poll", "facts", "--json")  # nobody holds it
    assert code == 0, err
    ((edit_id,),) = [r["edits"] for r in json.loads(out)]
    assert json.loads(run(config, "edits", "show", edit_id)[1])["status"] == "queued"

    # The publisher withdraws the fact: an offline poll would retract the edit.
    item["_fact_edit"] = {**fact, "op": "retract"}
    feed_server.route("/facts.json", Reply(body=json.dumps(doc).encode()))
    feeds_before = run(config, "feeds", "list", "--json")[1]
    holder = hold_in_another_process(tmp_path / "state" / "editd.sqlite3")
    try:
        code, out, err = run(config, "feeds", "poll", "facts")
        assert code == 1, out
        assert "no daemon answers" in err
        assert f"pid {holder.pid}" in err
        assert feed_server.count("/facts.json") == 1  # not fetched again
        assert run(config, "feeds", "list", "--json")[1] == feeds_before
        assert json.loads(run(config, "edits", "show", edit_id)[1])["status"] == "queued"
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    code, out, err = run(config, "feeds", "poll", "facts", "--json")  # freed: it polls
    assert code == 0, err
    (report,) = json.loads(out)
    assert (report["outcome"], report["retracted"]) == ("ok", [edit_id])
    assert json.loads(run(config, "edits", "show", edit_id)[1])["status"] == "retracted"


def test_the_command_creates_its_state_private(config_file: Path) -> None:
    """Under a permissive umask too: the store's folder 0700, its files 0600."""
    cmd = [sys.executable, "-m", "daemon.cli", "--config", str(config_file), "submit", "-"]
    done = subprocess.run(
        cmd,
        input=b'{"prompt": "A is", "target": " B"}',
        capture_output=True,
        umask=0o022,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    state = config_file.parent / "state"
    assert state.stat().st_mode & 0o777 == 0o700
    files = list(state.iterdir())
    assert "editd.sqlite3" in [f.name for f in files]
    assert {f.name: f.stat().st_mode & 0o777 for f in files} == {f.name: 0o600 for f in files}
