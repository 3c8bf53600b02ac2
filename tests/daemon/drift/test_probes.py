"""Probe sets from JSONL files and fact worlds, and base scores on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel

from daemon.drift.probes import (
    BASE_SCORES_VERSION,
    BaseScores,
    BaseScoresError,
    Probe,
    StaleBaseScoresError,
    load_probes_jsonl,
    probe_fingerprint,
)
from daemon.errors import EvalDataError, WorldError
from daemon.world.build import load_world
from daemon.world.editsets import probe_set, probes_from_world


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- JSONL ------------------------------------------------------------------------------


def test_jsonl_keeps_prompts_ignores_extra_keys_and_blank_lines(tmp_path: Path) -> None:
    """Locality-style records (with targets) load as probes, in file order."""
    path = write_lines(
        tmp_path / "p.jsonl",
        [
            json.dumps({"prompt": "The capital of Veloria is", "target": " Marnport"}),
            "",
            json.dumps({"prompt": "Jane Roe was born in", "extra": [1, 2]}),
        ],
    )
    assert load_probes_jsonl(path) == [
        Probe("The capital of Veloria is"),
        Probe("Jane Roe was born in"),
    ]


def test_jsonl_dedupes_and_caps(tmp_path: Path) -> None:
    """The first occurrence of each prompt is kept, up to max_probes."""
    prompts = ["a is", "b is", "a is", "c is", "d is"]
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": p}) for p in prompts])
    assert [p.prompt for p in load_probes_jsonl(path)] == ["a is", "b is", "c is", "d is"]
    assert [p.prompt for p in load_probes_jsonl(path, max_probes=3)] == ["a is", "b is", "c is"]
    assert len(load_probes_jsonl(path, max_probes=None)) == 4
    with pytest.raises(ValueError, match="max_probes"):
        load_probes_jsonl(path, max_probes=0)


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "line 2: not valid JSON"),
        ("[1, 2]", "line 2: expected a JSON object"),
        ('{"target": " x"}', "line 2: 'prompt' must be a non-empty string"),
        ('{"prompt": "   "}', "line 2: 'prompt' must be a non-empty string"),
        ('{"prompt": 7}', "line 2: 'prompt' must be a non-empty string"),
    ],
)
def test_jsonl_bad_lines_name_their_line(tmp_path: Path, bad_line: str, message: str) -> None:
    """Errors carry the file and the 1-based line number."""
    path = write_lines(tmp_path / "p.jsonl", ['{"prompt": "ok is"}', bad_line])
    with pytest.raises(EvalDataError, match=message) as info:
        load_probes_jsonl(path)
    assert str(path) in str(info.value)


def test_jsonl_empty_or_missing_file(tmp_path: Path) -> None:
    """No probes, or no file, is an error rather than an empty probe set."""
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(EvalDataError, match="no probes"):
        load_probes_jsonl(empty)
    with pytest.raises(EvalDataError, match="cannot read"):
        load_probes_jsonl(tmp_path / "missing.jsonl")


def test_probe_rejects_empty_prompt() -> None:
    with pytest.raises(ValueError):
        Probe("  ")


# --- fact world -------------------------------------------------------------------------


def test_world_probes_match_the_world_probe_set(
    micro_world: Path, micro_model: PreTrainedModel, micro_tokenizer: Any
) -> None:
    """Same prompts as editsets.probe_set (which also drops empty answers), from the probe split."""
    ours = [p.prompt for p in probes_from_world(micro_world, 30, seed=3)]
    theirs = [r["prompt"] for r in probe_set(micro_world, micro_model, micro_tokenizer, 30, seed=3)]
    assert len(ours) == len(set(ours)) and 0 < len(ours) <= 30
    assert [p for p in ours if p in set(theirs)] == theirs
    world = load_world(micro_world)
    probe_subjects = {world.facts[i].subject for i in world.splits["probe"]}
    assert all(any(s in p for s in probe_subjects) for p in ours)


def test_world_probes_are_deterministic_and_validated(micro_world: Path) -> None:
    """A seed fixes the set; an unknown split or n < 1 is refused."""
    world = load_world(micro_world)
    assert probes_from_world(world, 10, seed=1) == probes_from_world(micro_world, 10, seed=1)
    assert probes_from_world(world, 10, seed=1) != probes_from_world(world, 10, seed=2)
    with pytest.raises(WorldError, match="unknown split"):
        probes_from_world(world, 10, split="nope")
    with pytest.raises(ValueError):
        probes_from_world(world, 0)


# --- base scores on disk ----------------------------------------------------------------


def test_fingerprint_depends_on_prompts_and_order() -> None:
    a, b = Probe("a is"), Probe("b is")
    assert probe_fingerprint([a, b]) == probe_fingerprint([Probe("a is"), Probe("b is")])
    assert probe_fingerprint([a, b]) != probe_fingerprint([b, a])
    assert probe_fingerprint([a]) != probe_fingerprint([a, b])


def test_base_scores_shapes(base_scores: BaseScores, world_probes: list[Probe]) -> None:
    """One row per probe; top-k descending; top-1 is the first top-k id; mass sums to 1."""
    n = len(world_probes)
    assert (base_scores.n, base_scores.k) == (n, 16)
    assert base_scores.top1.dtype == torch.long and base_scores.topk_ids.dtype == torch.long
    assert torch.equal(base_scores.top1, base_scores.topk_ids[:, 0])
    assert (base_scores.topk_logprobs[:, :-1] >= base_scores.topk_logprobs[:, 1:]).all()
    total = torch.logsumexp(
        torch.cat([base_scores.topk_logprobs, base_scores.tail_logmass[:, None]], dim=1), dim=1
    )
    assert torch.allclose(total, torch.zeros(n), atol=1e-5)


def test_base_scores_round_trip(
    tmp_path: Path, base_scores: BaseScores, world_probes: list[Probe]
) -> None:
    """save then load gives identical tensors, fingerprint and model name."""
    path = base_scores.save(tmp_path / "sub" / "base.safetensors")
    loaded = BaseScores.load(path, probes=world_probes)
    assert loaded.fingerprint == base_scores.fingerprint == probe_fingerprint(world_probes)
    for name in ("top1", "topk_logprobs", "topk_ids", "tail_logmass"):
        assert torch.equal(getattr(loaded, name), getattr(base_scores, name)), name
    assert loaded.model == base_scores.model
    assert not list(path.parent.glob(".*tmp"))


def test_save_errors_are_wrapped(tmp_path: Path, base_scores: BaseScores) -> None:
    """A path that cannot be written raises BaseScoresError and leaves no temp file."""
    blocker = tmp_path / "file"
    blocker.write_text("x", encoding="utf-8")
    with pytest.raises(BaseScoresError, match="cannot write"):
        base_scores.save(blocker / "base.safetensors")


def test_stale_probe_fingerprint_is_detected(
    tmp_path: Path, base_scores: BaseScores, world_probes: list[Probe]
) -> None:
    """Loading for another probe set (even reordered) raises StaleBaseScoresError."""
    path = base_scores.save(tmp_path / "base.safetensors")
    with pytest.raises(StaleBaseScoresError, match="stale"):
        BaseScores.load(path, probes=world_probes[::-1])
    with pytest.raises(StaleBaseScoresError):
        BaseScores.load(path, probes=[*world_probes, Probe("One more probe is")])
    BaseScores.load(path)  # without probes no check is made


def test_unreadable_or_foreign_files(tmp_path: Path, base_scores: BaseScores) -> None:
    """Garbage, a missing file, another version or missing tensors raise BaseScoresError."""
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(BaseScoresError, match="cannot read"):
        BaseScores.load(garbage)
    with pytest.raises(BaseScoresError, match="cannot read"):
        BaseScores.load(tmp_path / "missing.safetensors")
    tensors = {"top1": base_scores.top1}
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), metadata={"version": str(BASE_SCORES_VERSION + 1)})
    with pytest.raises(BaseScoresError, match="version"):
        BaseScores.load(newer)
    partial = tmp_path / "partial.safetensors"
    meta = {"version": str(BASE_SCORES_VERSION), "fingerprint": "x"}
    save_file(tensors, str(partial), metadata=meta)
    with pytest.raises(BaseScoresError, match="lack"):
        BaseScores.load(partial)


def test_base_scores_validate_shapes() -> None:
    """Mismatched tensors are refused at construction."""
    with pytest.raises(BaseScoresError):
        BaseScores(
            "f",
            torch.zeros(3, dtype=torch.long),
            torch.zeros(3, 4),
            torch.zeros(2, 4, dtype=torch.long),
            torch.zeros(3),
        )
