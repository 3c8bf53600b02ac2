"""bench/floor.py: the per-floor config, the floor list and the calibrated floor in a log."""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

import pytest

from bench.floor import HOOK_TOML, calibrated_floor, floor_config, parse_floors


@pytest.mark.parametrize(("floor", "value"), [("0.6", 0.6), ("auto", "auto")])
def test_the_floor_lands_in_the_hook_table_and_var_is_absolute(
    tmp_path: Path, floor: str, value: float | str
) -> None:
    text = floor_config(HOOK_TOML.read_text(encoding="utf-8"), floor, tmp_path / "var")
    cfg = tomllib.loads(text)
    hook = cfg["editors"]["hook"]
    assert hook["gate_subject_cos_floor"] == value
    assert hook["layers"] == [2, 3] and hook["key_position"] == "prompt_last"
    assert cfg["store"]["path"] == f"{(tmp_path / 'var').as_posix()}/editd.sqlite3"
    assert "../var" not in text


def test_a_config_without_a_hook_table_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\[editors.hook\]"):
        floor_config("[store]\npath = 'x'\n", "0.6", Path("/v"))


def test_floors_parse_and_are_checked() -> None:
    assert parse_floors("0.55, 0.6,auto") == ["0.55", "0.6", "auto"]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_floors("1.5")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_floors(" , ")


def test_the_last_calibrated_floor_is_read_from_json_or_console_lines() -> None:
    json_line = json.dumps({"floor": 0.66, "event": "hook_floor_calibrated", "negatives": 9})
    console = "2026-11-21 [info] hook_floor_calibrated  floor=0.52 negatives=10"
    assert calibrated_floor(f"noise\n{json_line}\n") == 0.66
    assert calibrated_floor(f"{json_line}\n{console}\n") == 0.52
    assert calibrated_floor("hook_floor_default reason=x floor=0.55\n") is None
