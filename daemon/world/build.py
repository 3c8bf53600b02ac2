"""Build a fact-world model folder: generate, tokenise, train, evaluate, publish.

A built folder is a normal Hugging Face model folder (``config.json``,
``model.safetensors``, ``generation_config.json``, ``tokenizer.json``,
``tokenizer_config.json``) plus ``world.json`` (entities, facts, templates,
splits, spec, seed, version) and ``build_report.json`` (accuracies, steps,
seconds, ``ready``). The folder is assembled in a hidden sibling and renamed
into place at the end, so a crashed build never leaves a half-written folder
that looks finished. A model whose greedy exact-match accuracy on the
training-template prompts is below the bar is still written, with
``"ready": false``, and ``WorldNotReadyError`` is raised.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from daemon.errors import WorldBuildError, WorldFormatError, WorldNotReadyError
from daemon.files import open_private, swap_folder
from daemon.log import get_logger
from daemon.world.evaluate import WorldAccuracy, evaluate_world
from daemon.world.facts import GENERATOR_VERSION, WORLD_SPECS, World, WorldSpec, generate_world
from daemon.world.tokenizer import gpt2_tokenizer, train_bpe_tokenizer
from daemon.world.train import ARCHS, Arch, TrainSpec, build_model, encode_examples, train_model

BUILD_FORMAT_VERSION = 1
DEFAULT_MIN_ACCURACY = 0.95
WORLD_FILE, REPORT_FILE = "world.json", "build_report.json"
log = get_logger(__name__)


@dataclass(frozen=True)
class SizePreset:
    """Everything a world size fixes: the world, the model and its training, the vocabulary."""

    world: WorldSpec
    train: TrainSpec
    vocab_size: int


PRESETS: dict[str, SizePreset] = {
    "micro": SizePreset(
        world=WORLD_SPECS["micro"],
        train=TrainSpec(n_layers=2, hidden=64, n_heads=4, max_steps=800, batch_size=32, lr=3e-3),
        vocab_size=768,
    ),
    "small": SizePreset(
        world=WORLD_SPECS["small"],
        train=TrainSpec(
            n_layers=4,
            hidden=192,
            n_heads=4,
            intermediate=512,
            max_steps=4000,
            batch_size=32,
            lr=1e-3,
            stop_accuracy=0.98,
        ),
        vocab_size=2048,
    ),
    # Six times the small world's facts; ~0.33 s per step on one CPU thread, so a build
    # takes most of an hour on a CPU and minutes on a GPU.
    "medium": SizePreset(
        world=WORLD_SPECS["medium"],
        train=TrainSpec(
            n_layers=4,
            hidden=256,
            n_heads=4,
            intermediate=1024,
            max_steps=12000,
            batch_size=64,
            lr=1e-3,
            stop_accuracy=0.97,
        ),
        vocab_size=4096,
    ),
}


@dataclass(frozen=True)
class WorldBuildReport:
    """The outcome of one build; also written to ``build_report.json``."""

    path: Path
    size: str
    arch: str
    seed: int
    n_facts: int
    train_accuracy: float
    heldout_accuracy: float
    teacher_forced_accuracy: float
    min_accuracy: float
    ready: bool
    steps: int
    epochs: int
    train_seconds: float
    seconds: float
    n_parameters: int
    tokenizer: str
    train_accuracy_by_relation: dict[str, float] = field(default_factory=dict)
    heldout_accuracy_by_relation: dict[str, float] = field(default_factory=dict)
    heldout_accuracy_by_kind: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return {"version": BUILD_FORMAT_VERSION, **data}


def build_world(
    out_dir: Path | str,
    *,
    size: str = "micro",
    arch: str = "llama",
    seed: int = 0,
    force: bool = False,
    threads: int = 1,
    progress: bool = True,
    min_accuracy: float | None = None,
    tokenizer_dir: Path | str | None = None,
) -> WorldBuildReport:
    """Build the ``size`` world with an ``arch`` model into ``out_dir``; see the module doc.

    ``tokenizer_dir`` (a folder with GPT-2's vocab.json + merges.txt) replaces the
    tokenizer trained on the corpus. Raises ``WorldBuildError`` for bad input or an
    existing non-empty ``out_dir`` without ``force``, and ``WorldNotReadyError`` (after
    writing the folder) when training-template accuracy is below ``min_accuracy``.
    """
    out = Path(out_dir)
    preset, model_arch = _check_args(out, size, arch, force)
    bar = DEFAULT_MIN_ACCURACY if min_accuracy is None else min_accuracy
    started = time.monotonic()
    with _torch_threads(threads):
        world = generate_world(preset.world, seed)
        tokenizer = _tokenizer(world, preset, tokenizer_dir)
        torch.manual_seed(seed)
        model = build_model(model_arch, preset.train, tokenizer)
        data = encode_examples(tokenizer, world.training_examples())
        trained = train_model(model, data, preset.train, seed=seed, progress=progress)
        accuracy = evaluate_world(model, tokenizer, world)
    report = WorldBuildReport(
        path=out,
        size=size,
        arch=arch,
        seed=seed,
        n_facts=len(world.facts),
        train_accuracy=accuracy.train,
        heldout_accuracy=accuracy.heldout,
        teacher_forced_accuracy=trained.teacher_forced_accuracy,
        min_accuracy=bar,
        ready=accuracy.train >= bar,
        steps=trained.steps,
        epochs=trained.epochs,
        train_seconds=round(trained.seconds, 2),
        seconds=round(time.monotonic() - started, 2),
        n_parameters=sum(p.numel() for p in model.parameters()),
        tokenizer="corpus-bpe" if tokenizer_dir is None else "gpt2",
        train_accuracy_by_relation=accuracy.train_by_relation,
        heldout_accuracy_by_relation=accuracy.heldout_by_relation,
        heldout_accuracy_by_kind=accuracy.heldout_by_kind,
    )
    _publish(out, model, tokenizer, world, report, progress=progress)
    _log_built(report, accuracy)
    if not report.ready:
        raise WorldNotReadyError(out, accuracy.train, bar)
    return report


def _check_args(out: Path, size: str, arch: str, force: bool) -> tuple[SizePreset, Arch]:
    if size not in PRESETS:
        raise WorldBuildError(f"unknown world size {size!r} (expected one of {sorted(PRESETS)})")
    if arch not in ARCHS:
        raise WorldBuildError(f"unknown architecture {arch!r} (expected one of {list(ARCHS)})")
    if out.exists() and not out.is_dir():
        raise WorldBuildError("exists and is not a folder", path=out)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise WorldBuildError(
            "folder exists and is not empty (use --force to replace it)", path=out
        )
    model_arch: Arch = "llama" if arch == "llama" else "gpt2"
    return PRESETS[size], model_arch


def _tokenizer(
    world: World, preset: SizePreset, tokenizer_dir: Path | str | None
) -> PreTrainedTokenizerBase:
    if tokenizer_dir is not None:
        return gpt2_tokenizer(Path(tokenizer_dir))
    return train_bpe_tokenizer(world.training_corpus(), preset.vocab_size)


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    if threads < 1:
        raise WorldBuildError(f"threads must be >= 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _publish(
    out: Path,
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    world: World,
    report: WorldBuildReport,
    *,
    progress: bool,
) -> None:
    """Write everything into a hidden sibling folder, then swap it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        with _hf_progress_bars(progress):
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_json(tmp / WORLD_FILE, world.to_json())
        _write_json(tmp / REPORT_FILE, report.to_json())
        swap_folder(tmp, out, old)
    except OSError as exc:
        raise WorldBuildError(f"could not write the world folder: {exc}", path=out) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _hf_progress_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' own progress bars (e.g. on save) unless ``enabled``."""
    before = hf_logging.is_progress_bar_enabled()
    if not enabled:
        cast(Any, hf_logging).disable_progress_bar()
    try:
        yield
    finally:
        if before and not enabled:
            cast(Any, hf_logging).enable_progress_bar()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")


def _log_built(report: WorldBuildReport, accuracy: WorldAccuracy) -> None:
    log.info(
        "world_built",
        path=str(report.path),
        size=report.size,
        arch=report.arch,
        n_facts=report.n_facts,
        train_accuracy=round(accuracy.train, 4),
        heldout_accuracy=round(accuracy.heldout, 4),
        steps=report.steps,
        seconds=report.seconds,
        ready=report.ready,
        min_accuracy=report.min_accuracy,
    )


# --- reading built worlds ------------------------------------------------------------


def load_world(folder: Path | str) -> World:
    """The ``World`` stored in a built folder's ``world.json``."""
    return World.from_json(_read_json(Path(folder) / WORLD_FILE))


def read_build_report(folder: Path | str) -> dict[str, Any]:
    """A built folder's ``build_report.json`` as a dict."""
    return _read_json(Path(folder) / REPORT_FILE)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise WorldFormatError(f"{path}: not found (is this a built world folder?)") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise WorldFormatError(f"{path}: unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise WorldFormatError(f"{path}: expected a JSON object")
    return data


def is_ready(folder: Path | str) -> bool:
    """Whether ``folder`` holds a finished build whose report says ``ready``."""
    try:
        return bool(read_build_report(folder).get("ready"))
    except WorldFormatError:
        return False


def world_key(size: str, arch: str, seed: int, tokenizer: str = "corpus-bpe") -> str:
    """A short hash of everything that determines a build's output."""
    if size not in PRESETS:
        raise WorldBuildError(f"unknown world size {size!r} (expected one of {sorted(PRESETS)})")
    preset = PRESETS[size]
    blob = json.dumps(
        {
            "generator": GENERATOR_VERSION,
            "build": BUILD_FORMAT_VERSION,
            "arch": arch,
            "seed": seed,
            "tokenizer": tokenizer,
            "vocab": preset.vocab_size,
            "world": asdict(preset.world),
            "train": asdict(preset.train),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cached_world(
    cache_root: Path | str,
    size: str = "small",
    arch: str = "llama",
    seed: int = 0,
    *,
    threads: int = 1,
    progress: bool = True,
    min_accuracy: float | None = None,
) -> Path:
    """The folder of a ready build of this world under ``cache_root``, built once if needed.

    Folders are named ``{size}-{arch}-seed{seed}-{key}`` where ``key`` hashes the
    presets and the generator version, so changed code never reuses a stale model.
    A file lock serialises concurrent builders of the same key.
    """
    root = Path(cache_root)
    folder = root / f"{size}-{arch}-seed{seed}-{world_key(size, arch, seed)}"
    if is_ready(folder):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with os.fdopen(open_private(root / f".{folder.name}.lock"), "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_ready(folder):
            build_world(
                folder,
                size=size,
                arch=arch,
                seed=seed,
                force=True,
                threads=threads,
                progress=progress,
                min_accuracy=min_accuracy,
            )
    return folder
