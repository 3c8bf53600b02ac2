"""Building a fact-world folder: speed, accuracy, loadability, refusals, caching."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import structlog
from transformers import AutoModelForCausalLM, AutoTokenizer

from daemon.errors import WorldBuildError, WorldFormatError, WorldNotReadyError
from daemon.files import swap_folder
from daemon.world import build
from daemon.world.build import (
    SizePreset,
    build_world,
    cached_world,
    is_ready,
    load_world,
    read_build_report,
    world_key,
)
from daemon.world.evaluate import evaluate_world
from daemon.world.facts import RELATIONS, WORLD_SPECS, generate_world
from daemon.world.train import TrainSpec

HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture
def untrained_micro(monkeypatch: pytest.MonkeyPatch) -> SizePreset:
    """Swap the micro preset for a 3-step run: a fast build that does not know its facts."""
    preset = SizePreset(
        world=WORLD_SPECS["micro"],
        train=TrainSpec(n_layers=1, hidden=32, n_heads=2, max_steps=3, batch_size=32, lr=1e-3),
        vocab_size=400,
    )
    monkeypatch.setitem(build.PRESETS, "micro", preset)
    return preset


def test_micro_build_is_fast_and_knows_its_facts(micro_world: Path) -> None:
    """The acceptance bar: < 60 s on one thread, >= 95% greedy exact match on training prompts."""
    report = read_build_report(micro_world)
    print(f"micro llama build: {json.dumps(report)}")
    assert report["ready"] is True
    assert report["seconds"] < 60
    assert report["train_accuracy"] >= 0.95
    assert 0.0 <= report["heldout_accuracy"] <= 1.0
    assert set(report["heldout_accuracy_by_kind"]) == {"recombined", "novel"}
    assert 200 <= report["n_facts"] <= 300
    assert set(report["train_accuracy_by_relation"]) == {r.name for r in RELATIONS}
    assert is_ready(micro_world)


def test_micro_folder_loads_with_auto_classes(micro_world: Path) -> None:
    """A normal HF folder: the loaded model reproduces the reported accuracies."""
    for name in (*HF_FILES, "world.json", "build_report.json"):
        assert (micro_world / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(micro_world)
    tokenizer = AutoTokenizer.from_pretrained(micro_world)
    assert model.config.model_type == "llama"
    assert tokenizer.is_fast
    accuracy = evaluate_world(model, tokenizer, load_world(micro_world))
    report = read_build_report(micro_world)
    assert accuracy.train >= 0.95
    assert accuracy.train == pytest.approx(report["train_accuracy"])
    assert accuracy.heldout == pytest.approx(report["heldout_accuracy"])


def test_world_json_is_the_generated_world(micro_world: Path) -> None:
    world = load_world(micro_world)
    assert world.to_json() == generate_world(WORLD_SPECS["micro"], seed=0).to_json()
    assert not list(micro_world.parent.glob(".micro-llama.*")), "temporary folders left behind"


def test_existing_folder_is_refused_without_force(tmp_path: Path) -> None:
    out = tmp_path / "world"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(WorldBuildError, match="--force") as info:
        build_world(out, size="micro", progress=False)
    assert str(out) in str(info.value)
    assert (out / "keep.txt").read_text() == "mine"


def test_a_file_in_the_way_is_refused(tmp_path: Path) -> None:
    (tmp_path / "world").write_text("x")
    with pytest.raises(WorldBuildError, match="not a folder"):
        build_world(tmp_path / "world", size="micro", progress=False, force=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"size": "huge"}, "size"), ({"arch": "mamba"}, "architecture"), ({"threads": 0}, "threads")],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(WorldBuildError, match=match):
        build_world(tmp_path / "w", progress=False, **kwargs)


def test_a_model_below_the_bar_is_written_but_not_ready(
    tmp_path: Path, untrained_micro: SizePreset
) -> None:
    out = tmp_path / "w"
    with pytest.raises(WorldNotReadyError) as info:
        build_world(out, size="micro", progress=False)
    assert info.value.required == 0.95
    report = read_build_report(out)
    assert report["ready"] is False
    assert report["train_accuracy"] < 0.95
    assert not is_ready(out)
    assert (out / "model.safetensors").is_file()


def test_force_replaces_an_existing_folder(tmp_path: Path, untrained_micro: SizePreset) -> None:
    out = tmp_path / "w"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with structlog.testing.capture_logs() as logs:
        report = build_world(out, size="micro", progress=False, force=True, min_accuracy=0.0)
    assert report.ready
    assert report.steps == 3
    assert not (out / "old.txt").exists()
    assert read_build_report(out)["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]
    built = [e for e in logs if e["event"] == "world_built"]
    assert len(built) == 1
    assert {"train_accuracy", "heldout_accuracy", "seconds", "steps"} <= set(built[0])


def test_cached_world_builds_once(
    tmp_path: Path, untrained_micro: SizePreset, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    real = build.build_world

    def counting(out: Path, **kwargs: Any) -> Any:
        calls.append(out)
        return real(out, **kwargs)

    monkeypatch.setattr(build, "build_world", counting)
    first = cached_world(tmp_path, "micro", "llama", 0, progress=False, min_accuracy=0.0)
    second = cached_world(tmp_path, "micro", "llama", 0, progress=False, min_accuracy=0.0)
    assert first == second
    assert len(calls) == 1
    assert is_ready(first)
    assert world_key("micro", "llama", 0) in first.name


def test_world_key_depends_on_what_shapes_the_build() -> None:
    keys = {
        world_key("micro", "llama", 0),
        world_key("micro", "gpt2", 0),
        world_key("micro", "llama", 1),
        world_key("small", "llama", 0),
    }
    assert len(keys) == 4
    assert world_key("micro", "llama", 0) == world_key("micro", "llama", 0)


def test_load_world_of_a_plain_folder_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(WorldFormatError, match=r"world\.json"):
        load_world(tmp_path)
    assert not is_ready(tmp_path)


def test_gpt2_micro_build(tmp_path: Path) -> None:
    """The GPT-2 architecture also learns the micro world and loads with the auto classes."""
    report = build_world(tmp_path / "g", size="micro", arch="gpt2", progress=False)
    print(f"micro gpt2 build: {json.dumps(report.to_json())}")
    assert report.ready
    assert report.train_accuracy >= 0.95
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "g")
    assert model.config.model_type == "gpt2"
    assert not model.training


def test_a_crash_while_writing_leaves_nothing_behind(
    tmp_path: Path, untrained_micro: SizePreset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder appears whole or not at all: no half-written world that looks built."""
    real = build._write_json

    def failing(path: Path, data: dict[str, Any]) -> None:
        if path.name == build.REPORT_FILE:
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(build, "_write_json", failing)
    with pytest.raises(WorldBuildError, match="disk full"):
        build_world(tmp_path / "w", size="micro", progress=False, min_accuracy=0.0)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_swap_puts_the_old_folder_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    new, out, old = tmp_path / "new", tmp_path / "out", tmp_path / "old"
    new.mkdir()
    out.mkdir()
    (out / "keep.txt").write_text("old world")
    real_rename = Path.rename

    def rename(self: Path, target: Any) -> Path:
        if self == new:
            raise OSError("cross-device link")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="cross-device"):
        swap_folder(new, out, old)
    assert (out / "keep.txt").read_text() == "old world"
    assert not old.exists()
