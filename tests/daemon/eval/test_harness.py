"""The harness, the noop and ft baselines, and ``editd eval`` on the micro fact world."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from daemon.cli import cli
from daemon.editors.base import EditSpec
from daemon.editors.ft import FtConfig, FtEditor
from daemon.editors.noop import NoopEditor
from daemon.eval.basetask import world_base_task
from daemon.eval.cases import load_cases
from daemon.eval.harness import EvalSettings, Harness, effective_checkpoints
from daemon.model.loading import LoadedModel, load_model
from daemon.world.editsets import counterfactual_edits, write_jsonl

N_EDITS = 8


@pytest.fixture(scope="module")
def loaded(micro_world: Path) -> LoadedModel:
    return load_model(str(micro_world), device="cpu")


@pytest.fixture(scope="module")
def edits_file(
    micro_world: Path, loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    records = counterfactual_edits(micro_world, loaded.model, loaded.tokenizer, N_EDITS, seed=1)
    path = tmp_path_factory.mktemp("edits") / "edits.jsonl"
    write_jsonl(path, records)
    return path


def _logits(loaded: LoadedModel, prompt: str) -> torch.Tensor:
    ids = loaded.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits: torch.Tensor = loaded.model(**ids).logits
    return logits


def test_effective_checkpoints_are_capped_sorted_and_end_at_n() -> None:
    assert effective_checkpoints([100, 10, 1000], 50) == [10, 50]
    assert effective_checkpoints([5], 5) == [5]


def test_noop_scores_no_efficacy_and_perfect_locality(
    loaded: LoadedModel, edits_file: Path, micro_world: Path
) -> None:
    cases = load_cases(edits_file).cases
    base_task = world_base_task(micro_world, n=50)
    assert base_task
    settings = EvalSettings(n=N_EDITS, checkpoints=(2, N_EDITS), progress=False)
    scores = Harness(NoopEditor(), loaded, settings, base_task=base_task).run(cases)
    assert [s.edits for s in scores] == [2, N_EDITS]
    final = scores[-1]
    assert final.efficacy == 0.0  # counterfactual targets: the base model says the true object
    assert final.paraphrase == 0.0
    assert final.locality == 1.0
    assert final.teacher_forced["locality"] == 1.0
    assert final.retention == 0.0
    assert final.base_task is not None and final.base_task >= 0.9
    # the model knows the true objects: they beat the counterfactual targets everywhere
    assert final.probability["es"] == 0.0 and final.probability["ps"] == 0.0
    assert final.probability["ns"] is not None


IDENTITY_CHAT = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def test_chat_efficacy_sends_each_prompt_through_the_chat_template(
    loaded: LoadedModel, edits_file: Path
) -> None:
    """``chat`` is None without a chat template; with one, each prompt is sent as a user
    turn and scored by whether the reply names the target."""
    cases = load_cases(edits_file).cases
    known = [
        dataclasses.replace(c, spec=dataclasses.replace(c.spec, target=str(c.target_true)))
        for c in cases
    ]
    settings = EvalSettings(n=N_EDITS, checkpoints=(N_EDITS,), progress=False)
    assert Harness(NoopEditor(), loaded, settings).run(known)[-1].chat is None

    tokenizer = copy.deepcopy(loaded.tokenizer)
    tokenizer.chat_template = IDENTITY_CHAT  # the user's text, nothing around it
    chatty = dataclasses.replace(loaded, tokenizer=tokenizer)
    own = Harness(NoopEditor(), chatty, settings).run(known)[-1]
    assert own.efficacy is not None and own.efficacy >= 0.9
    assert own.chat is not None and own.chat >= own.efficacy  # the reply names what it says
    assert Harness(NoopEditor(), chatty, settings).run(cases)[-1].chat == 0.0
    tokenizer.chat_template = "Nothing to do with it: " + IDENTITY_CHAT.replace("content", "role")
    assert Harness(NoopEditor(), chatty, settings).run(known)[-1].chat == 0.0


def test_ft_takes_most_edits(loaded: LoadedModel, edits_file: Path) -> None:
    cases = load_cases(edits_file).cases
    original = loaded.model.state_dict()
    saved = {k: v.clone() for k, v in original.items()}
    try:
        editor = FtEditor(
            loaded.model, loaded.tokenizer, FtConfig(max_steps=40, learning_rate=5e-3)
        )
        settings = EvalSettings(n=4, checkpoints=(4,), batch_size=1, progress=False)
        (final,) = Harness(editor, loaded, settings).run(cases)
        assert final.efficacy is not None and final.efficacy >= 0.5
        assert final.teacher_forced["efficacy"] is not None
        es = final.probability["es"]
        assert es is not None and es >= 0.5
        assert final.seconds_per_edit > 0
        assert editor.applied_ids() == [c.spec.edit_id for c in cases[:4]]
    finally:
        loaded.model.load_state_dict(saved)


def test_ft_state_round_trips_and_retraction_restores_the_base(
    loaded: LoadedModel, edits_file: Path
) -> None:
    case = load_cases(edits_file).cases[0]
    saved = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    base_logits = _logits(loaded, case.spec.prompt)
    try:
        editor = FtEditor(
            loaded.model, loaded.tokenizer, FtConfig(max_steps=10, learning_rate=5e-3)
        )
        editor.apply([case.spec])
        edited_logits = _logits(loaded, case.spec.prompt)
        assert not torch.equal(edited_logits, base_logits)
        state = editor.state_dict()
        editor.retract([case.spec.edit_id])
        assert torch.equal(_logits(loaded, case.spec.prompt), base_logits)
        assert editor.applied_ids() == []
        editor.load_state_dict(state)
        assert torch.equal(_logits(loaded, case.spec.prompt), edited_logits)
        assert editor.applied_ids() == [case.spec.edit_id]
        with pytest.raises(Exception, match="version"):
            editor.load_state_dict({**state, "version": 99})
    finally:
        loaded.model.load_state_dict(saved)


def test_edit_spec_refuses_a_subject_outside_the_prompt() -> None:
    with pytest.raises(ValueError, match="not in prompt"):
        EditSpec("e", "The CEO of Acme is", " Jane", subject="Initech")


def test_load_cases_counts_bad_records_with_their_line(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        json.dumps({"id": "a", "prompt": "A is", "target": " B"})
        + "\n"
        + json.dumps({"id": "b", "prompt": "A is"})
        + "\n"
    )
    loaded_cases = load_cases(path)
    assert [c.spec.edit_id for c in loaded_cases.cases] == ["a"]
    (error,) = loaded_cases.errors
    assert error.record == 2
    assert error.field == "target"


def test_eval_command_writes_json_markdown_and_png(
    micro_world: Path, edits_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    config = tmp_path / "c.toml"
    config.write_text('[model]\ndevice = "cpu"\n')
    result = CliRunner().invoke(
        cli,
        [
            "--config",
            str(config),
            "eval",
            "--model",
            str(micro_world),
            "--editor",
            "noop",
            "--edits",
            str(edits_file),
            "--n",
            "4",
            "--checkpoints",
            "2,4",
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["editor"] == "noop"
    assert report["n_edits"] == 4
    assert [c["edits"] for c in report["checkpoints"]] == [2, 4]
    first = report["checkpoints"][0]
    for key in (
        "efficacy",
        "paraphrase",
        "heldout",
        "locality",
        "retention",
        "teacher_forced",
        "seconds_per_edit",
        "peak_rss_mb",
    ):
        assert key in first
    assert set(first["teacher_forced"]) == {"efficacy", "paraphrase", "locality"}
    assert "| edits | efficacy |" in (out / "report.md").read_text()
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_stopped_eval_keeps_the_checkpoints_it_scored(
    micro_world: Path, edits_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each checkpoint rewrites the report, so a long run that dies keeps what it scored."""
    real_score = Harness.score
    calls: list[int] = []

    def score_then_die(self: Harness, state: Any, edits: int) -> Any:
        calls.append(edits)
        if len(calls) > 1:
            raise KeyboardInterrupt  # the operator stopped the run
        return real_score(self, state, edits)

    monkeypatch.setattr(Harness, "score", score_then_die)
    out = tmp_path / "report"
    config = tmp_path / "c.toml"
    config.write_text('[model]\ndevice = "cpu"\n')
    args = ["--config", str(config), "eval", "--model", str(micro_world), "--editor", "noop"]
    args += ["--edits", str(edits_file), "--n", "4", "--checkpoints", "2,4"]
    result = CliRunner().invoke(cli, [*args, "--out", str(out), "--quiet"])
    assert result.exit_code != 0 and calls == [2, 4]
    report = json.loads((out / "report.json").read_text())
    assert [c["edits"] for c in report["checkpoints"]] == [2]
    assert report["n_edits"] == 4


def test_eval_command_runs_the_hook_editor(
    micro_world: Path, edits_file: Path, tmp_path: Path
) -> None:
    config = tmp_path / "editd.toml"
    config.write_text(
        '[editors.hook]\nlayers = [1]\nkey_position = "prompt_last"\ncovariance_tokens = 20000\n',
        encoding="utf-8",
    )
    out = tmp_path / "r"
    result = CliRunner().invoke(
        cli,
        [
            "--config",
            str(config),
            "eval",
            "--model",
            str(micro_world),
            "--editor",
            "hook",
            "--edits",
            str(edits_file),
            "--n",
            "4",
            "--checkpoints",
            "4",
            "--batch-size",
            "2",
            "--quiet",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["editor"] == "hook"
    assert report["checkpoints"][-1]["efficacy"] >= 0.75
    assert (tmp_path / "var" / "stats").is_dir()  # cached beside the configured store


def test_eval_command_runs_the_melo_editor(
    micro_world: Path, edits_file: Path, tmp_path: Path
) -> None:
    config = tmp_path / "editd.toml"
    config.write_text("[editors.melo]\nmax_blocks = 16\n", encoding="utf-8")
    out = tmp_path / "r"
    args = ["--config", str(config), "eval", "--model", str(micro_world), "--editor", "melo"]
    args += ["--edits", str(edits_file), "--n", "4", "--checkpoints", "4", "--batch-size", "2"]
    result = CliRunner().invoke(cli, [*args, "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["editor"] == "melo"
    assert report["checkpoints"][-1]["efficacy"] == 1.0
    assert report["checkpoints"][-1]["retention"] == 1.0
