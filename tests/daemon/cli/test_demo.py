"""``editd demo``: the walk-through against a real ``editd serve`` child on the micro world."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from daemon.cli import cli
from tests.daemon.service.conftest import write_config


def test_demo_edits_retracts_and_stops_cleanly(micro_world: Path, tmp_path: Path) -> None:
    """The demo shows before/after answers through both back-ends, a retraction that
    restores the base answer, a summary, and a daemon that exits 0 on SIGTERM; its
    state lives in --state-dir, never in the configured store."""
    config = write_config(tmp_path / "user", micro_world, drift={"enabled": False})
    state_dir = tmp_path / "demo-state"
    result = CliRunner().invoke(
        cli, ["--config", str(config), "demo", "--n", "4", "--state-dir", str(state_dir)]
    )
    out = result.stdout
    assert result.exit_code == 0, out + result.stderr
    assert "ready on port" in out
    lines = out[out.index("before and after") :].splitlines()
    header = lines[1]
    at = {name: header.index(name) for name in ("before", "target", "after", "back-end")}
    rows = lines[2:6]
    for row in rows:
        before, target, after = (
            row[at[a] : at[a] + 14].strip() for a in ("before", "target", "after")
        )
        assert before and before != target and after == target, row  # edited: new answer
    backends = [row[at["back-end"] :].split()[0] for row in rows]
    assert backends[2:] == ["melo", "melo"]  # forced to MELO
    assert "(from hook)" in out or backends[:2] == ["hook", "hook"]  # forced to hook (or escalated)
    assert re.search(r"(\d) of \1 applied edits now answer their new target", out)
    assert "status:        retracted" in out
    assert "-> back to the base model: True" in out
    assert "[6/6] summary" in out and "s per edit" in out
    assert "SIGTERM: the daemon exited with status 0" in out
    assert "shutdown checkpoint: ck-" in out
    assert (state_dir / "editd.sqlite3").is_file()
    assert not (tmp_path / "user" / "var" / "editd.sqlite3").exists()  # the user's store


def test_demo_refuses_a_model_that_is_not_a_fact_world(tmp_path: Path) -> None:
    """Without world.json there is nothing to draw edits from: a one-line error, exit 1."""
    folder = tmp_path / "not-a-world"
    folder.mkdir()
    config = write_config(tmp_path / "user", folder)
    result = CliRunner().invoke(cli, ["--config", str(config), "demo"])
    assert result.exit_code == 1
    assert "world.json" in result.stderr and "world:small" in result.stderr
