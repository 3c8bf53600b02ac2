"""``editd locate``: the table, --json, the cache beside the store, fact sources, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from daemon.cli import cli
from daemon.editors.hook.locate import LocateResult, world_trace_facts
from daemon.world.build import WORLD_FILE, load_world


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "editd.toml"
    path.write_text('[store]\npath = "state/editd.sqlite3"\n')
    return path


def run(config: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["--config", str(config), "locate", *args])
    return result.exit_code, result.stdout, result.stderr


def test_locate_prints_evidence_table_and_choice(config_file: Path, micro_world: Path) -> None:
    code, out, err = run(config_file, "--model", str(micro_world), "--n", "16")
    assert code == 0, err
    lines = out.splitlines()
    assert "16 prompt pairs over 16 templates" in out
    header = next(line for line in lines if line.lstrip().startswith("layer"))
    for column in ("residual:subject_last", "residual:prompt_last", "mlp_out:prompt_last"):
        assert column in header
    rows = [line.split() for line in lines if line[:5].strip().isdigit()]
    assert [r[0] for r in rows] == ["0", "1"]
    assert rows[1][2] == "1.000" and rows[1][-1] == "*"  # last-layer residual at the last token
    assert "key_position = prompt_last" in out
    assert "layers = [1]  (window 1" in out
    assert len(list((config_file.parent / "state" / "locate").glob("locate-*.json"))) == 1


def test_locate_json_is_reused_from_the_cache(config_file: Path, micro_world: Path) -> None:
    code, first, err = run(config_file, "--model", str(micro_world), "--n", "16", "--json")
    assert code == 0, err
    data = json.loads(first)
    result = LocateResult.from_json(data)
    assert result.key_position == "prompt_last" and result.layers == (1,)
    assert data["version"] == 1 and data["n_pairs"] == 16
    assert data["model_id"] == str(micro_world.resolve())
    code, second, _ = run(config_file, "--model", str(micro_world), "--n", "16", "--json")
    assert code == 0 and second == first  # same seconds: nothing was recomputed
    code, wide, _ = run(
        config_file, "--model", str(micro_world), "--n", "16", "--window", "2", "--json"
    )
    assert code == 0 and json.loads(wide)["layers"] == [0, 1]
    assert json.loads(wide)["evidence"] == data["evidence"]


def test_locate_traces_an_edit_request_file(
    config_file: Path, micro_world: Path, tmp_path: Path
) -> None:
    """Targets are new facts, so the model's own answers are traced."""
    facts = world_trace_facts(load_world(micro_world), limit=48)
    path = tmp_path / "edits.jsonl"
    rows = [{"prompt": f.prompt, "subject": f.subject, "target": " Zed"} for f in facts]
    path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"prompt": "x"}\n')
    args = ("--model", str(micro_world), "--facts", str(path), "--n", "8", "--json")
    code, out, err = run(config_file, *args)
    assert code == 0, err
    assert "skipped:" in err and "target" in err
    evidence = json.loads(out)["evidence"]
    assert (evidence["n_facts"], evidence["n_recalled"], evidence["n_pairs"]) == (48, 48, 8)


def test_too_few_pairs_is_a_one_line_error(
    config_file: Path, micro_world: Path, tmp_path: Path
) -> None:
    path = tmp_path / "edits.jsonl"
    path.write_text(json.dumps({"prompt": "Kovi is", "subject": "Kovi", "target": " x"}) + "\n")
    code, out, err = run(config_file, "--model", str(micro_world), "--facts", str(path))
    assert code == 1 and out == ""
    assert err.startswith("editd: error: only 0 usable prompt pairs (need 8)")


def test_a_model_without_world_facts_needs_a_facts_file(
    config_file: Path, micro_world: Path, tmp_path: Path
) -> None:
    bare = tmp_path / "bare-model"
    shutil.copytree(micro_world, bare, ignore=shutil.ignore_patterns(WORLD_FILE))
    code, _, err = run(config_file, "--model", str(bare))
    assert code == 1
    assert err.startswith("editd: error: no facts to trace") and "--facts" in err


def test_configured_hook_settings_are_noted(tmp_path: Path, micro_world: Path) -> None:
    config = tmp_path / "editd.toml"
    config.write_text(
        '[store]\npath = "state/editd.sqlite3"\n'
        '[editors.hook]\nlayers = [0]\nkey_position = "subject_last"\n'
    )
    code, out, err = run(config, "--model", str(micro_world), "--n", "8")
    assert code == 0, err
    assert "note: [editors.hook] layers = [0] overrides this choice" in out
    assert "key_position = 'subject_last' overrides" in out
