"""Building a hook editor from configuration: text source, statistics, layers, key position.

``[editors.hook]`` decides:

- ``covariance_source``: ``"auto"`` (the model's own training text when its model
  source knows it, as for a fact-world model, else the shipped Wikipedia passages),
  ``"world"`` (the model's own training text, required), ``"wikibio"`` (464 English Wikipedia
  biographies shipped in ``daemon/data``, about 33,000 tokens; see its NOTICE.md), or
  a path to a text file (one text per line) or a JSONL file (a ``text`` field, else
  ``prompt`` + ``target``). The same texts calibrate the scope gate.
- ``layers`` / ``key_position``: given values win; otherwise the cached result of
  ``editd locate`` for this model decides; without one, the architecture table's
  middle block and subject-last keys (what large models need). Note: locate ranks
  layers by how much patching the MLP output moves answers; it does not yet weigh
  how well a layer's keys separate one fact from another for the scope gate
  (BENCHMARKS.md has a case where that matters).
- ``gate_subject_cos_floor = "auto"``: once the editor is built (its gates
  calibrated), a seeded sample of the model's labelled facts (its model source's, else
  the shipped common facts it states) under their training templates is keyed at the
  lowest hook layer (the configured key position, the gate's centre) and
  :mod:`daemon.editors.hook.gate` picks the floor, which every hook layer then uses.
  A model without a subject gate or enough same-subject pairs keeps
  ``DEFAULT_SUBJECT_COS_FLOOR``. The floor is a persisted
  hook buffer: a loaded state keeps the floor it was saved with.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn

from daemon.drift.commonfacts import known_facts
from daemon.editors.hook.config import HookConfig, HookLayout
from daemon.editors.hook.editor import HookEditor
from daemon.editors.hook.gate import (
    DEFAULT_SUBJECT_COS_FLOOR,
    MIN_PAIRS,
    FactLabel,
    FloorEvidence,
    floor_rule,
    pair_cosines,
)
from daemon.editors.hook.keys import KeyKind, capture, encode_sites
from daemon.editors.hook.stats import cached_covariance
from daemon.errors import ConfigError
from daemon.facts import FactSet, fill
from daemon.model import arch
from daemon.model.knowledge import knowledge_of
from daemon.model.loading import LoadedModel

log = structlog.get_logger()

CALIBRATION_TEXTS = 256
"""How many texts of the source calibrate the scope gate (spread evenly over it)."""


SHIPPED_TEXTS = {"wikibio": "wikibio-passages.jsonl"}
"""``covariance_source`` names of the text files shipped in ``daemon/data``."""


def read_text_source(source: str, model_path: str) -> list[str]:
    """The texts of ``covariance_source`` (see the module docstring)."""
    known = knowledge_of(model_path) if source in ("auto", "world") else None
    if source == "auto":
        source = "world" if known is not None else "wikibio"
    if source in SHIPPED_TEXTS:
        data = resources.files("daemon") / "data" / SHIPPED_TEXTS[source]
        return [json.loads(line)["text"] for line in data.read_text("utf-8").splitlines() if line]
    if source == "world":
        if known is None:
            raise ConfigError(
                f"editors.hook.covariance_source = 'world' needs a model whose training "
                f"text editd knows (a fact-world model), but {model_path} is not one; "
                "name a text or JSONL file instead",
                key="editors.hook.covariance_source",
            )
        return known.corpus()
    path = Path(source)
    if not path.is_file():
        raise ConfigError(
            f"editors.hook.covariance_source: {path} is not a file",
            key="editors.hook.covariance_source",
        )
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(lines, start=1):
            if not line:
                continue
            try:
                row = json.loads(line)
                text = row.get("text") or (row["prompt"] + row.get("target", ""))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ConfigError(
                    f"{path}:{n}: not a JSON object with 'text' or 'prompt': {exc}",
                    key="editors.hook.covariance_source",
                ) from exc
            texts.append(str(text))
        return texts
    return [line for line in lines if line]


def spread_sample(texts: Sequence[str], k: int) -> list[str]:
    """``k`` texts spread evenly over ``texts`` (deterministic)."""
    if len(texts) <= k:
        return list(texts)
    step = len(texts) / k
    return [texts[int(i * step)] for i in range(k)]


def choose_layout(
    loaded: LoadedModel,
    cfg: HookConfig,
    located: tuple[Sequence[int], KeyKind] | None,
) -> HookLayout:
    """Layers and key position: configured values, else ``located``, else the defaults;
    the subject floor as configured (``"auto"``: the default until calibrated)."""
    layers = tuple(cfg.layers) or (tuple(located[0]) if located else ())
    if not layers:
        layers = arch.default_hook_layers(loaded.model)
    if cfg.key_position != "auto":
        kind: KeyKind = cfg.key_position
    elif located is not None:
        kind = located[1]
    else:
        kind = "subject_last"
    floor = cfg.gate_subject_cos_floor
    return HookLayout(
        layers=tuple(sorted(layers)),
        key_position=kind,
        subject_cos_floor=DEFAULT_SUBJECT_COS_FLOOR if floor == "auto" else float(floor),
    )


LOCATE_PAIRS = 64
"""Prompt pairs traced when the editor runs locate itself (as ``editd locate`` does)."""


def labelled_facts(loaded: LoadedModel) -> FactSet:
    """The facts to locate and calibrate on: those the model's source knows it states (a
    fact world's), else the shipped common facts the model states itself
    (:func:`daemon.drift.commonfacts.known_facts`)."""
    known = knowledge_of(loaded.name_or_path)
    if known is not None:
        return known.facts
    return known_facts(loaded.model, loaded.tokenizer)


def _located_layout(
    loaded: LoadedModel, cache_dir: Path, facts: FactSet
) -> tuple[Sequence[int], KeyKind] | None:
    """The cached locate result for this model; with none cached, locate now on
    ``facts`` and cache it. Too few facts to trace gives None (the defaults, with a
    warning naming ``editd locate --facts``)."""
    from daemon.editors.hook.locate import (
        cached_locate,
        latest_locate,
        locate_cache_dir,
        world_trace_facts,
    )

    cache = locate_cache_dir(cache_dir)
    found = latest_locate(cache, loaded)
    if found is None and facts.facts:
        traced = world_trace_facts(facts, limit=4 * LOCATE_PAIRS)
        found = cached_locate(cache, loaded, traced, max_pairs=LOCATE_PAIRS)
    if found is None:
        log.warning(
            "hook_layout_defaults",
            reason="no locate result for this model: run `editd locate --facts FILE`",
        )
        return None
    return found.layout()


def build_hook_editor(
    loaded: LoadedModel,
    cfg: HookConfig,
    *,
    cache_dir: Path,
    located: tuple[Sequence[int], KeyKind] | None = None,
    stats_dir: Path | None = None,
    progress: bool = False,
) -> HookEditor:
    """A hook editor for ``loaded`` as ``[editors.hook]`` (``cfg``) describes it; key
    statistics are cached in ``stats_dir`` (default ``cache_dir/stats``), locate results
    in ``cache_dir/locate``."""
    facts: FactSet | None = None
    if located is None and (not cfg.layers or cfg.key_position == "auto"):
        facts = labelled_facts(loaded)
        located = _located_layout(loaded, cache_dir, facts)
    layout = choose_layout(loaded, cfg, located)
    texts = read_text_source(cfg.covariance_source, loaded.name_or_path)
    cache = stats_dir or cache_dir / "stats"
    covariance = cached_covariance(
        cache,
        loaded.model,
        loaded.tokenizer,
        texts,
        layout.layers,
        cfg.covariance_tokens,
        loaded.cache_id,
        progress=progress,
    )
    log.info("hook_editor_layout", layers=list(layout.layers), key_position=layout.key_position)
    editor = HookEditor(
        loaded.model,
        loaded.tokenizer,
        cfg,
        layout,
        covariance,
        spread_sample(texts, CALIBRATION_TEXTS),
    )
    if cfg.gate_subject_cos_floor == "auto":
        auto_subject_floor(editor, facts or labelled_facts(loaded))
    return editor


# --- gate_subject_cos_floor = "auto" -------------------------------------------------------

FLOOR_SUBJECTS = 300
"""At most this many subjects (of two relations or more) calibrate the automatic floor."""

FLOOR_PROMPTS = 3000
"""At most this many prompts (every training template of each sampled subject's facts)."""

FLOOR_BATCH = 256


def world_floor_facts(
    world: FactSet,
    *,
    max_subjects: int = FLOOR_SUBJECTS,
    max_prompts: int = FLOOR_PROMPTS,
    seed: int = 0,
) -> list[tuple[FactLabel, str, str]]:
    """``(label, prompt, target)`` for a seeded sample of the subjects with facts under
    two relations or more: every fact of each under every TRAINING template."""
    by_subject: dict[str, list[Any]] = {}
    for fact in world.facts:
        by_subject.setdefault(fact.subject, []).append(fact)
    eligible = sorted(s for s, fs in by_subject.items() if len({f.relation for f in fs}) >= 2)
    random.Random(seed).shuffle(eligible)
    out: list[tuple[FactLabel, str, str]] = []
    for subject in eligible[:max_subjects]:
        rows = [
            (FactLabel(subject, f.relation, t), fill(template, subject), f.target)
            for f in by_subject[subject]
            for t, template in enumerate(world.relation(f.relation).train_templates)
        ]
        if len(out) + len(rows) > max_prompts:
            break
        out.extend(rows)
    return out


def floor_keys(
    editor: HookEditor, prompts: Sequence[str], targets: Sequence[str], subjects: Sequence[str]
) -> torch.Tensor:
    """Centred unit keys ``(n, d_in)`` of the base model at the lowest hook layer, one per
    prompt, at the editor's key position (a prompt-last key: the prompt's last token)."""
    layer = editor.layout.layers[0]
    parts = []
    for start in range(0, len(prompts), FLOOR_BATCH):
        rows = slice(start, start + FLOOR_BATCH)
        sites, _ = encode_sites(
            editor.tokenizer,
            prompts[rows],
            targets[rows],
            subjects[rows],
            list(range(len(prompts[rows]))),
            editor.layout.key_position,
            editor.device,
        )
        keys = capture(editor.model, editor.hooks, sites, [layer], layer, apply_deltas=False)
        first = torch.ones_like(sites.owner, dtype=torch.bool)  # each prompt's first site
        first[1:] = sites.owner[1:] != sites.owner[:-1]
        parts.append(keys.keys[layer][first])
    center = editor.hooks[layer].center
    return nn.functional.normalize(torch.cat(parts).float() - center, dim=-1)


def set_subject_floor(editor: HookEditor, floor: float) -> None:
    """Every hook layer's subject-gate floor (and the editor's layout) to ``floor``."""
    for hook in editor.hooks.values():
        hook.subject_cos_floor.fill_(floor)
    editor.layout = dataclasses.replace(editor.layout, subject_cos_floor=floor)


def auto_subject_floor(editor: HookEditor, labelled: FactSet, *, seed: int = 0) -> float:
    """Calibrate the subject gate's floor (``"auto"``, see the module docstring) on
    ``labelled`` facts and set it; a model it cannot be calibrated on keeps the default.
    Returns the floor."""
    reason = None
    if editor.config.gate_scope != "subject":
        reason = f"gate_scope is {editor.config.gate_scope!r}: no subject gate"
    else:
        evidence, reason = _calibrated_floor(editor, labelled, seed)
        if evidence is not None:
            set_subject_floor(editor, evidence.floor)
            return evidence.floor
    log.warning("hook_floor_default", reason=reason, floor=DEFAULT_SUBJECT_COS_FLOOR)
    return DEFAULT_SUBJECT_COS_FLOOR


def _calibrated_floor(
    editor: HookEditor, labelled: FactSet, seed: int
) -> tuple[FloorEvidence | None, str]:
    """The floor's evidence from ``labelled`` facts (logged), or None and why."""
    t0 = time.perf_counter()
    facts = world_floor_facts(labelled, seed=seed)
    if not facts:
        return None, "no subject with facts under two relations or more"
    labels = [label for label, _, _ in facts]
    prompts, targets = [p for _, p, _ in facts], [t for _, _, t in facts]
    keys = floor_keys(editor, prompts, targets, [label.subject for label in labels])
    negatives, positives = pair_cosines(keys, labels)
    evidence = floor_rule(negatives, positives)
    if evidence is None:
        return None, f"{negatives.numel()} same-subject, other-relation pairs (< {MIN_PAIRS})"
    log.info(
        "hook_floor_calibrated",
        layer=editor.layout.layers[0],
        key_position=editor.layout.key_position,
        prompts=len(prompts),
        subjects=len({label.subject for label in labels}),
        seconds=round(time.perf_counter() - t0, 2),
        **evidence.as_dict(),
    )
    return evidence, "calibrated"
