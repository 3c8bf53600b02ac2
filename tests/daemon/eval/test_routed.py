"""``auto`` in the harness and ``editd eval``: the daemon's dispatch on the micro world."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from daemon.cli import cli
from daemon.config import RouterConfig, load_config, parse_config
from daemon.editors.base import Editor, EditOutcome, EditSpec
from daemon.editors.noop import NoopEditor
from daemon.editors.registry import HOOK, MELO, make_editor
from daemon.engine.engine import Engine
from daemon.eval.cases import load_cases
from daemon.eval.harness import EvalSettings, Harness
from daemon.eval.routed import RoutedEditor, build_routed_editor
from daemon.model.loading import LoadedModel, load_model
from daemon.world.editsets import counterfactual_edits, write_jsonl
from store.schema import Backend
from tests.daemon.service.conftest import write_toml

HOOK_SETTINGS = {"layers": [1], "key_position": "prompt_last", "covariance_tokens": 20000}
# Prompt-last MELO keys, the micro world's setting: auto then sends facts to the hook,
# whose escalations these tests follow (with subject keys MELO takes them: test_router).
MELO_SETTINGS = {"max_blocks": 16, "key_position": "prompt_last"}


@pytest.fixture
def loaded(micro_world: Path) -> LoadedModel:
    """A fresh model per test: the editors install their hooks and blocks into it."""
    return load_model(str(micro_world), device="cpu")


@pytest.fixture(scope="module")
def mixed_edits(micro_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six counterfactual edits; the last two without a subject (the router's MELO rule)."""
    loaded = load_model(str(micro_world), device="cpu")
    records = counterfactual_edits(micro_world, loaded.model, loaded.tokenizer, 6, seed=3)
    for record in records[4:]:
        del record["subject"]
    path = tmp_path_factory.mktemp("edits") / "mixed.jsonl"
    write_jsonl(path, records)
    return path


def _config(folder: Path, **sections: dict[str, Any]) -> Path:
    tables: dict[str, dict[str, Any]] = {
        "editors.hook": dict(HOOK_SETTINGS),
        "editors.melo": dict(MELO_SETTINGS),
        **sections,
    }
    return write_toml(folder, tables)


def test_auto_routes_to_both_backends_and_escalates_a_refused_hook_edit(
    loaded: LoadedModel, mixed_edits: Path, tmp_path: Path
) -> None:
    """Subject edits go to the hook, subjectless ones to MELO; the hook refuses one edit
    (as it does, e.g., when its update norm is out of range) and MELO takes it instead."""
    config = load_config(_config(tmp_path))
    editor = build_routed_editor(loaded, config)
    hook = editor.engine.editor(HOOK)
    real_apply = hook.apply
    cases = list(load_cases(mixed_edits).cases)
    refused_id = cases[1].spec.edit_id

    def refusing_apply(edits: Sequence[EditSpec]) -> list[EditOutcome]:
        kept = [e for e in edits if e.edit_id != refused_id]
        taken = {o.edit_id: o for o in real_apply(kept)}
        return [
            taken.get(e.edit_id) or EditOutcome(e.edit_id, False, "update norm out of range")
            for e in edits
        ]

    hook.apply = refusing_apply  # type: ignore[method-assign]
    settings = EvalSettings(n=6, checkpoints=(3, 6), batch_size=3, progress=False)
    scores = Harness(editor, loaded, settings).run(cases)
    routing = scores[-1].routing
    assert routing is not None
    assert routing["routed"] == {"hook": 4, "melo": 2}
    assert routing["escalated"] >= 1
    assert routing["applied"]["hook"] >= 1 and routing["applied"]["melo"] >= 3
    assert sum(routing["applied"].values()) + routing["failed"] == 6
    assert scores[-1].refused == routing["failed"]
    assert editor.engine.backend_of(refused_id) is MELO
    assert scores[0].routing is not None and sum(scores[0].routing["routed"].values()) == 3
    assert scores[-1].efficacy is not None and scores[-1].efficacy >= 0.8
    assert "routing" in scores[-1].to_json_dict()


def test_a_case_that_names_a_backend_gets_it(
    loaded: LoadedModel, mixed_edits: Path, tmp_path: Path
) -> None:
    """A request's explicit back-end survives into the eval case and the dispatch
    (auto would send this subject-bearing, short-target edit to the hook)."""
    case = replace(load_cases(mixed_edits).cases[0], backend=MELO)
    editors: dict[Backend, Editor] = {
        HOOK: NoopEditor(),
        MELO: make_editor(
            "melo",
            loaded,
            parse_config({"editors": {"melo": MELO_SETTINGS}}).editors.melo,
            cache_dir=tmp_path,
        ),
    }
    editor = RoutedEditor(Engine(loaded, editors), RouterConfig(), verify=False)
    [outcome] = editor.apply_routed([(case.spec, case.backend)])
    assert outcome.accepted and outcome.details["backend"] == "melo"
    assert outcome.details["route"] == "melo"
    assert editor.tally.routed == {"melo": 1}
    [outcome] = editor.apply([case.spec])
    assert outcome.details["route"] == "hook"


def test_eval_command_runs_auto_and_reports_routing(
    micro_world: Path, mixed_edits: Path, tmp_path: Path
) -> None:
    """A hook that cannot make its edits take (one tiny optimisation step) fails
    verification: every hook edit is retracted and escalated to MELO, as in the daemon."""
    config = _config(
        tmp_path,
        **{"editors.hook": {**HOOK_SETTINGS, "target_steps": 1, "target_learning_rate": 1e-4}},
    )
    out = tmp_path / "r"
    args = ["--config", str(config), "eval", "--model", str(micro_world), "--editor", "auto"]
    args += ["--edits", str(mixed_edits), "--n", "6", "--checkpoints", "6", "--batch-size", "6"]
    result = CliRunner().invoke(cli, [*args, "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["editor"] == "auto"
    assert report["settings"]["verify"] is True
    assert report["settings"]["router"]["escalate_to_melo"] is True
    last = report["checkpoints"][-1]
    assert last["routing"] == {
        "routed": {"hook": 4, "melo": 2},
        "applied": {"hook": 0, "melo": 6 - last["routing"]["failed"]},
        "escalated": 4,
        "failed": last["routing"]["failed"],
    }
    assert last["efficacy"] >= 0.8
    assert "routing: routed hook 4, melo 2" in (out / "report.md").read_text()
