"""``editd world build``: an existing output folder is replaced only with --force."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from daemon.cli import cli


def build(tmp_path: Path, *args: str) -> Any:
    config = tmp_path / "editd.toml"
    config.write_text('[model]\nworld_cache = "worlds"\n')
    return CliRunner().invoke(cli, ["--config", str(config), "world", "build", *args, "--quiet"])


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The folders ``build_world`` was asked for (it builds nothing here)."""
    asked: list[Path] = []

    def record(out: Path, **_: Any) -> None:
        asked.append(out)
        raise RuntimeError("stub: no build in this test")

    monkeypatch.setattr("daemon.world.build.build_world", record)
    return asked


@pytest.mark.parametrize("content", [None, "keep.txt"], ids=["empty", "not-empty"])
def test_an_existing_out_folder_is_refused_without_force(
    tmp_path: Path, builds: list[Path], content: str | None
) -> None:
    out = tmp_path / "world"
    out.mkdir()
    if content:
        (out / content).write_text("mine")
    result = build(tmp_path, "--out", str(out))
    assert result.exit_code == 1
    assert f"'{out}' already exists (pass --force to replace it)" in result.stderr
    assert builds == []  # refused before any training
    assert out.is_dir()
    assert [p.name for p in out.iterdir()] == ([content] if content else [])


def test_force_goes_ahead(tmp_path: Path, builds: list[Path]) -> None:
    out = tmp_path / "world"
    out.mkdir()
    result = build(tmp_path, "--out", str(out), "--force")
    assert builds == [out]
    assert isinstance(result.exception, RuntimeError)


def test_the_default_folder_is_refused_too(tmp_path: Path, builds: list[Path]) -> None:
    (tmp_path / "worlds" / "micro-llama-seed0").mkdir(parents=True)
    result = build(tmp_path)
    assert result.exit_code == 1
    assert "already exists" in result.stderr
    assert builds == []
