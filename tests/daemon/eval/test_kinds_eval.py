"""The forget protocol and the behaviour suite's parts, on the micro world's model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from daemon.cli.app import cli
from daemon.config import load_config
from daemon.eval.behaviour import is_refusal, load_sets, next_token_probabilities
from daemon.eval.forgetting import ForgetCase, forget_known, known_facts
from daemon.eval.routed import build_routed_editor
from daemon.model.loading import load_model
from daemon.world.editsets import counterfactual_edits
from store.records import EditRequest, parse_edit_request
from tests.daemon.service.conftest import write_config


@pytest.fixture(scope="module")
def facts(micro_world: Path) -> list[EditRequest]:
    base = load_model(str(micro_world), device="cpu")
    edits = counterfactual_edits(micro_world, base.model, base.tokenizer, 8, seed=3)
    return [parse_edit_request(e) for e in edits]


def test_forgetting_known_facts_stops_the_leaks_and_retraction_brings_them_back(
    micro_world: Path, tmp_path: Path, facts: list[EditRequest]
) -> None:
    cfg = load_config(write_config(tmp_path, micro_world))
    engine = build_routed_editor(load_model(str(micro_world), device="cpu"), cfg).engine
    known = known_facts(engine, facts, 3)
    assert len(known) == 3
    assert all(ForgetCase(f).probes(engine)["adversarial"][0].startswith("Tell me") for f in known)
    report = forget_known(engine, facts, 3, cfg.router)
    assert report["known"] == 3 and report["failed"] == {}
    assert sum(report["applied_by"].values()) == 3
    assert report["base"]["leak"]["prompt"] == 1.0  # it knew them
    assert report["edited"]["leak"]["prompt"] == 0.0  # verification saw to that
    assert report["edited"]["probability"]["prompt"] < report["base"]["probability"]["prompt"]
    assert report["retracted"]["leak"] == report["base"]["leak"]
    assert report["restored_exactly"] == 1.0
    assert not engine.applied_ids() or not any(engine.applied_ids().values())


def test_eval_task_forget_writes_its_report(
    micro_world: Path, tmp_path: Path, facts: list[EditRequest]
) -> None:
    records = [
        {
            "case_id": i,
            "prompt": f.prompt,
            "subject": f.subject,
            "target_new": f.target.strip(),
            "ground_truth": (f.target_true or "").strip(),
            "rephrase_prompt": f.rephrases[0] if f.rephrases else f.prompt,
            "locality_prompt": f.locality[0].prompt,
            "locality_ground_truth": f.locality[0].target.strip(),
        }
        for i, f in enumerate(facts)
        if f.locality
    ]
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(records))
    config = write_config(tmp_path, micro_world)
    out = tmp_path / "out"
    args = ["--config", str(config), "eval", "--task", "forget", "--model", str(micro_world)]
    args += ["--editor", "hook", "--edits", str(data), "--n", "2", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "forget.json").read_text())
    assert report["task"] == "forget" and report["known"] == 2
    assert report["applied_by"] == {"hook": 2}
    assert report["edited"]["leak"]["prompt"] == 0.0
    missing = CliRunner().invoke(cli, [*args[:7], "--editor", "auto", "--out", str(out)])
    assert missing.exit_code == 2 and "--edits" in missing.output


@pytest.mark.parametrize(
    ("reply", "refused"),
    [
        (" I can't help with that.", True),
        ("I\u2019m sorry, but I cannot assist.", True),
        ("Sorry, but I can't do that.", True),
        ("No, I will not write that.", True),
        (" Sure! Pancakes need flour, eggs and milk.", False),
        (" Bomb disposal experts first make the area safe; I cannot stress enough...", False),
    ],
)
def test_is_refusal_reads_the_opening(reply: str, refused: bool) -> None:
    assert is_refusal(reply) is refused


def test_the_shipped_sets_hold_what_the_issue_asks() -> None:
    sets: dict[str, Any] = load_sets()
    assert len(sets["identity"]["heldout"]) == 20
    assert not set(sets["identity"]["heldout"]) & set(sets["identity"]["train"])
    assert len(sets["refusal"]["harmful"]) == len(sets["refusal"]["benign"]) == 20
    assert all(len(pair) == 2 and pair[0] != pair[1] for pair in sets["refusal"]["harmful"])
    assert not set(sets["bias"]["train"]) & set(sets["bias"]["heldout"])


def test_next_token_probabilities_match_a_single_forward(micro_world: Path, tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, micro_world))
    loaded = load_model(str(micro_world), device="cpu")
    engine = build_routed_editor(loaded, cfg).engine
    prompts = ["The capital of", "A much longer prompt about the capital of"]
    words = (" he", " she")
    got = next_token_probabilities(engine, prompts, words)
    tok = loaded.tokenizer
    for prompt, probs in zip(prompts, got, strict=True):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            p = torch.softmax(loaded.model(input_ids=ids).logits[0, -1].float(), dim=-1)
        for word in words:
            first = tok(prompt + word)["input_ids"][len(ids[0])]
            assert math.isclose(probs[word], float(p[first]), rel_tol=1e-3, abs_tol=1e-6)


def test_knowundo_names_rouge_and_requests() -> None:
    from daemon.eval.knowundo import QA, forget_requests, person_of, rouge_l_recall

    assert person_of("Who are Isabella Marquez's parents?") == "Isabella Marquez"
    assert person_of("How can fans reach out to Hiro Tanaka?") == "Hiro Tanaka"
    assert person_of("what is this?") is None
    assert rouge_l_recall("her father is a climate scientist", "Her father is a scientist") == 1.0
    assert rouge_l_recall("nothing shared", "Her father is a scientist") == 0.0
    assert rouge_l_recall("father her is", "her father is") == 2 / 3
    requests, skipped = forget_requests(
        [QA("Where does Hiro Tanaka live?", "In Kyoto."), QA("What is it?", "A cat.")],
        " [withheld]",
    )
    assert skipped == 1 and len(requests) == 1
    assert requests[0].subject == "Hiro Tanaka" and requests[0].kind.value == "forget"
    assert requests[0].prompt.startswith("Question: Where does Hiro Tanaka live?")


def test_finetune_teaches_the_answers(micro_world: Path) -> None:
    from daemon.eval.knowundo import QA, finetune

    loaded = load_model(str(micro_world), device="cpu", dtype="float32")
    loaded.model.requires_grad_(True)
    pairs = [QA(f"Who is person {i}?", f"Person {i} is a teacher.") for i in range(4)]
    losses = finetune(loaded.model, loaded.tokenizer, pairs, epochs=3, batch_size=4)
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert not loaded.model.training
