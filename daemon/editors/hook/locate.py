"""Locate: where a model recalls facts, so the hook back-end knows where to write.

COMEBA-HK writes an edit into the MLP output projection of a few layers, keyed at
one token position. Both choices depend on the model: large models (GPT-2 XL,
GPT-J) recall a fact at the SUBJECT'S LAST TOKEN in middle layers (ROME), while a
small fact-world model moves the subject forward with attention early and recalls
at the PROMPT'S LAST TOKEN. So the editor asks the model, once, and caches the
answer (``cached_locate``; ``editd locate`` on the command line).

Facts come from a fact world (``world_trace_facts``) or a JSONL file of edit
requests (``request_trace_facts``), are paired (``make_pairs``) and traced
(``trace_recall``) into a :class:`LocateEvidence`; ``choose`` picks the key
position and hook layers from that evidence, and :class:`LocateResult` holds the
choice with its evidence and provenance. ``locate`` runs both; ``cached_locate``
caches the result. The batches and forward hooks that patch one hidden state live
in :mod:`daemon.editors.hook.patching`.

Evidence: interchange interventions
-----------------------------------
Prompts are paired: same template, different subjects, different first answer
tokens (``make_pairs``). For a pair (A, B) the clean run of B is recorded; then A
is run again with ONE hidden state replaced by B's at the same kind of position
(A's subject last token gets B's subject last token, A's prompt last token gets B's
prompt last token) and one layer, at one of two sites:

- ``residual``: the decoder block's output (the whole residual stream there);
- ``mlp_out``: the output of the block's MLP output projection only.

The pair "moved" when A's greedy next token became B's first answer token. Per
site, position kind and layer the evidence holds the moved fraction and the mean
probability of B's token (a graded signal where nothing moves). All of it runs as
a few large left-padded batches: every (pair, site, kind, layer) is one row, and a
forward hook per block and per MLP projection patches only its own rows.

The choice (``choose``)
-----------------------
- key position: the kind whose ``mlp_out`` patches move the most answers summed
  over all layers; ties go to the ``residual`` moved sum, then the ``mlp_out``
  probability sum, then to ``subject_last``.
- hook layers: the contiguous window of ``window`` layers (default
  ``round(L / 4)``, at least 2 from L = 4; never starting at layer 0 from L = 4,
  see ``first_candidate_layer``) with the highest ``mlp_out`` moved sum at that kind;
  ties go to the higher ``mlp_out`` probability sum, then the higher ``residual``
  moved sum, then the DEEPER window (the scope gate separates subjects better in
  deeper layers; see :mod:`daemon.editors.hook.layer`).

Why ``mlp_out`` leads: the residual stream at the prompt's last token in the last
layer IS the prediction, so patching it moves every answer by construction, and
late residual layers there score high on any model. The MLP output at one layer
is what a hook edit can change. ``LocateEvidence.layer_scores`` and
``best_window`` let an editor choose differently (e.g. away from MELO's layers).

Cache
-----
``locate_cache_dir(cache_dir)``, i.e. ``locate/`` in the editors' cache folder beside
the SQLite store (next to the covariance ``stats/``), one
``locate-<fingerprint16>-<settings16>.json`` per model id and fingerprint
(``stats.model_fingerprint``), dtype, facts and ``max_pairs``; written atomically;
unreadable, corrupt or stale files are logged and recomputed. The window is not part
of the key: a cached result is re-chosen for another window from its stored evidence.
A file holds a :class:`LocateResult` (``to_json``/``from_json``,
``LOCATE_FORMAT_VERSION``).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import structlog
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from daemon.editors.hook.patching import (
    KINDS,
    SITES,
    PositionKind,
    Site,
    TraceFact,
    capture_donor_states,
    patched_scores,
    prepare,
    recalled_tokens,
)
from daemon.editors.hook.stats import model_fingerprint
from daemon.errors import EditValidationError, LocateError
from daemon.facts import FactSet, fill
from daemon.files import atomic_write_text
from daemon.model import arch
from daemon.model.batches import padding_id
from daemon.model.loading import LoadedModel
from store.records import iter_jsonl

log = structlog.get_logger()

LOCATE_FORMAT_VERSION = 1

DEFAULT_MAX_PAIRS = 64
DEFAULT_MIN_PAIRS = 8
DEFAULT_BATCH_ROWS = 128


# --- facts and pairs -----------------------------------------------------------------


def _round_robin(groups: Sequence[Sequence[Any]], limit: int | None, turn: int = 1) -> list[Any]:
    """``turn`` items from each group in turn, so a prefix spreads over the groups."""
    out: list[Any] = []
    for r in range(0, max((len(g) for g in groups), default=0), turn):
        for group in groups:
            for item in group[r : r + turn]:
                out.append(item)
                if limit is not None and len(out) >= limit:
                    return out
    return out


WORLD_FACTS_PER_TURN = 4
"""Facts a template contributes at a time: even a short prefix holds pairs (two per template)."""


def world_trace_facts(
    world: FactSet, *, limit: int | None = None, seed: int = 0
) -> list[TraceFact]:
    """Facts of a fact world under its TRAINING templates, spread over relations and templates.

    Each (relation, template) group is shuffled with its own seeded generator;
    groups are ordered template index first (so consecutive groups are different
    relations) and contribute ``WORLD_FACTS_PER_TURN`` facts in turn.
    """
    groups: list[list[TraceFact]] = []
    n_templates = max(len(r.train_templates) for r in world.relations)
    for t in range(n_templates):
        for rel in world.relations:
            if t >= len(rel.train_templates):
                continue
            order = [f for f in world.facts if f.relation == rel.name]
            random.Random(f"{seed}:{rel.name}:{t}").shuffle(order)
            template = rel.train_templates[t]
            groups.append(
                [TraceFact(fill(template, f.subject), f.subject, f.target) for f in order]
            )
    return _round_robin(groups, limit, WORLD_FACTS_PER_TURN)


def request_trace_facts(path: Path) -> tuple[list[TraceFact], list[str]]:
    """Facts from a JSONL file of edit requests: each prompt and rephrase holding the subject.

    Targets are ignored (they are the new facts); ``answer`` is left ``None``.
    Returns the facts and one line per record that could not be used.
    """
    facts: list[TraceFact] = []
    skipped: list[str] = []
    for lineno, item in iter_jsonl(path):
        if isinstance(item, EditValidationError):
            skipped.append(str(item))
            continue
        if not item.subject:
            skipped.append(f"{path}, record {lineno}: no subject (locate needs one)")
            continue
        needle = item.subject.strip()
        facts.extend(
            TraceFact(p, item.subject) for p in (item.prompt, *item.rephrases) if needle in p
        )
    return list(dict.fromkeys(facts)), skipped


def make_pairs(
    facts: Sequence[TraceFact], answer_tokens: Sequence[int], max_pairs: int
) -> list[tuple[int, int]]:
    """``(a, b)`` index pairs: same template, different subject and first answer token.

    Within a template group each fact is paired with the next one (cyclically)
    that differs from it; groups are interleaved so a prefix spans the templates.
    """
    groups: dict[str, list[int]] = {}
    for i, fact in enumerate(facts):
        groups.setdefault(fact.template(), []).append(i)
    per_group: list[list[tuple[int, int]]] = []
    for members in groups.values():
        pairs: list[tuple[int, int]] = []
        for j, a in enumerate(members):
            for step in range(1, len(members)):
                b = members[(j + step) % len(members)]
                differs = facts[a].subject.strip() != facts[b].subject.strip()
                if differs and answer_tokens[a] != answer_tokens[b]:
                    pairs.append((a, b))
                    break
        per_group.append(pairs)
    return _round_robin(per_group, max_pairs)


# --- evidence ------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceScores:
    """Per layer: the fraction of pairs moved to B's answer, and B's mean probability."""

    moved: tuple[float, ...]
    donor_prob: tuple[float, ...]


@dataclass(frozen=True)
class LocateEvidence:
    """What ``trace_recall`` measured; ``scores[site][kind]`` covers every layer."""

    n_layers: int
    n_pairs: int
    n_facts: int  # distinct facts offered
    n_recalled: int  # of which the model answers correctly
    n_templates: int  # templates the pairs come from
    baseline_donor_prob: float  # B's answer probability on A, unpatched
    scores: Mapping[Site, Mapping[PositionKind, TraceScores]]

    def layer_scores(self, kind: PositionKind) -> tuple[float, ...]:
        """The per-layer score the layer choice ranks by: ``mlp_out`` moved fraction."""
        return self.scores["mlp_out"][kind].moved

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "scores"}
        out["scores"] = {
            s: {k: {f: list(v) for f, v in asdict(t).items()} for k, t in by_kind.items()}
            for s, by_kind in self.scores.items()
        }
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LocateEvidence:
        scores = {
            s: {
                k: TraceScores(
                    tuple(float(x) for x in data["scores"][s][k]["moved"]),
                    tuple(float(x) for x in data["scores"][s][k]["donor_prob"]),
                )
                for k in KINDS
            }
            for s in SITES
        }
        fields = ("n_layers", "n_pairs", "n_facts", "n_recalled", "n_templates")
        ints = {f: int(data[f]) for f in fields}
        lengths = {len(t.moved) for by_kind in scores.values() for t in by_kind.values()}
        lengths |= {len(t.donor_prob) for by_kind in scores.values() for t in by_kind.values()}
        if lengths != {ints["n_layers"]}:
            raise ValueError(f"per-layer scores do not have n_layers={ints['n_layers']} entries")
        return cls(**ints, baseline_donor_prob=float(data["baseline_donor_prob"]), scores=scores)


@torch.no_grad()
def trace_recall(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[TraceFact],
    *,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    min_pairs: int = DEFAULT_MIN_PAIRS,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> LocateEvidence:
    """Interchange-intervention evidence of where ``model`` recalls ``facts`` (module doc).

    ``batch_rows`` bounds the rows of one forward pass (one row per pair and
    patch). Raises ``LocateError`` when fewer than ``min(min_pairs, max_pairs)``
    pairs can be formed from the facts the model recalls.
    """
    start = time.perf_counter()
    was_training = model.training
    model.train(False)
    try:
        evidence = _measure(model, tokenizer, facts, max_pairs, min_pairs, batch_rows)
    finally:
        model.train(was_training)
    log.info(
        "recall_traced",
        pairs=evidence.n_pairs,
        facts=evidence.n_facts,
        recalled=evidence.n_recalled,
        seconds=round(time.perf_counter() - start, 3),
    )
    return evidence


def _measure(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[TraceFact],
    max_pairs: int,
    min_pairs: int,
    batch_rows: int,
) -> LocateEvidence:
    prep = prepare(tokenizer, facts)
    tokens = recalled_tokens(model, tokenizer, prep, batch_rows)
    keep = [i for i, t in enumerate(tokens) if t is not None]
    recalled = prep.subset(keep)
    answer = [cast(int, tokens[i]) for i in keep]
    pairs = make_pairs(recalled.facts, answer, max_pairs)
    need = max(1, min(min_pairs, max_pairs))
    if len(pairs) < need:
        raise LocateError(
            f"only {len(pairs)} usable prompt pairs (need {need}): of {len(prep.facts)} "
            f"facts the model recalls {len(keep)}, and a pair needs two of them under the "
            "same template with different subjects and answers",
            pairs=len(pairs),
            facts=len(prep.facts),
            recalled=len(keep),
        )
    pad = padding_id(tokenizer)
    donors = sorted({b for _, b in pairs})
    slot = {b: i for i, b in enumerate(donors)}
    states = capture_donor_states(model, recalled.subset(donors), pad, batch_rows)
    slots = [slot[b] for _, b in pairs]
    moved, prob, base = patched_scores(
        model, recalled, pairs, answer, states, slots, pad, batch_rows
    )
    return LocateEvidence(
        n_layers=arch.num_layers(model),
        n_pairs=len(pairs),
        n_facts=len(prep.facts),
        n_recalled=len(keep),
        n_templates=len({recalled.facts[a].template() for a, _ in pairs}),
        baseline_donor_prob=base,
        scores={
            s: {
                k: TraceScores(tuple(moved[si, ki].tolist()), tuple(prob[si, ki].tolist()))
                for ki, k in enumerate(KINDS)
            }
            for si, s in enumerate(SITES)
        },
    )


# --- the choice ----------------------------------------------------------------------


def default_window(n_layers: int) -> int:
    """How many hook layers to choose by default: ``round(L / 4)``, at least 2 from
    L = 4 (spreading an update over two layers halves each layer's share), else 1."""
    return max(2 if n_layers >= 4 else 1, round(n_layers / 4))


def first_candidate_layer(n_layers: int) -> int:
    """Layer 0 is a candidate only in models of fewer than 4 layers.

    The MLP input at layer 0 is the token embedding mixed by one attention layer:
    locality prompts sit about as close to an edit's key there as rephrases do, so
    a layer-0 scope gate cannot tell them apart, even though patching layer 0's MLP
    moves the most answers.
    """
    return 1 if n_layers >= 4 else 0


def _total(values: Sequence[float]) -> float:
    return round(sum(values), 9)  # exact ties despite float summation order


def choose_key_position(evidence: LocateEvidence) -> PositionKind:
    """The kind whose ``mlp_out`` patches move most answers (ties: module doc)."""

    def rank(kind: PositionKind) -> tuple[float, float, float]:
        mlp, res = evidence.scores["mlp_out"][kind], evidence.scores["residual"][kind]
        return _total(mlp.moved), _total(res.moved), _total(mlp.donor_prob)

    return max(KINDS, key=rank)  # max keeps the first of equals: subject_last


def best_window(evidence: LocateEvidence, kind: PositionKind, window: int) -> tuple[int, ...]:
    """The contiguous ``window`` layers with the most ``mlp_out`` moves at ``kind``."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    size = min(window, evidence.n_layers)
    mlp, res = evidence.scores["mlp_out"][kind], evidence.scores["residual"][kind]
    best: tuple[tuple[float, float, float], int] | None = None
    start = min(first_candidate_layer(evidence.n_layers), evidence.n_layers - size)
    for first in range(start, evidence.n_layers - size + 1):
        span = slice(first, first + size)
        rank = (_total(mlp.moved[span]), _total(mlp.donor_prob[span]), _total(res.moved[span]))
        if best is None or rank >= best[0]:  # >=: ties go to the deeper window
            best = (rank, first)
    assert best is not None  # size <= n_layers, so the loop ran
    return tuple(range(best[1], best[1] + size))


def choose(
    evidence: LocateEvidence, window: int | None = None
) -> tuple[PositionKind, tuple[int, ...]]:
    """Key position and hook layers by the rule in the module docstring."""
    kind = choose_key_position(evidence)
    size = default_window(evidence.n_layers) if window is None else window
    return kind, best_window(evidence, kind, size)


# --- the result ----------------------------------------------------------------------


@dataclass(frozen=True)
class LocateResult:
    """The chosen key position and hook layers, with the evidence behind them."""

    key_position: PositionKind
    layers: tuple[int, ...]
    evidence: LocateEvidence
    model_id: str
    fingerprint: str
    n_pairs: int
    seconds: float
    window: int
    facts_sha256: str

    def layout(self) -> tuple[tuple[int, ...], PositionKind]:
        """``(layers, key_position)``, the shape ``build_hook_editor(located=...)`` takes."""
        return self.layers, self.key_position

    def rechoose(self, window: int | None) -> LocateResult:
        """The same evidence with the choice remade for another window."""
        size = default_window(self.evidence.n_layers) if window is None else window
        kind, layers = choose(self.evidence, size)
        return replace(self, key_position=kind, layers=layers, window=size)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "evidence"}
        out.update(version=LOCATE_FORMAT_VERSION, layers=list(self.layers))
        out["evidence"] = self.evidence.to_json()
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LocateResult:
        """Parse ``to_json`` output; raises ``LocateError`` on another version or bad data."""
        if not isinstance(data, Mapping) or data.get("version") != LOCATE_FORMAT_VERSION:
            raise LocateError(
                f"unsupported locate result (expected version {LOCATE_FORMAT_VERSION})"
            )
        try:
            kind = data["key_position"]
            if kind not in KINDS:
                raise ValueError(f"unknown key_position {kind!r}")
            return cls(
                key_position=kind,
                layers=tuple(int(i) for i in data["layers"]),
                evidence=LocateEvidence.from_json(data["evidence"]),
                model_id=str(data["model_id"]),
                fingerprint=str(data["fingerprint"]),
                n_pairs=int(data["n_pairs"]),
                seconds=float(data["seconds"]),
                window=int(data["window"]),
                facts_sha256=str(data["facts_sha256"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise LocateError(f"malformed locate result: {e!r}") from e


# --- locate --------------------------------------------------------------------------


def facts_sha256(facts: Sequence[TraceFact]) -> str:
    """sha256 of the facts in order (JSON per fact)."""
    h = hashlib.sha256()
    for f in facts:
        h.update(json.dumps([f.prompt, f.subject, f.answer]).encode() + b"\n")
    return h.hexdigest()


def locate(
    loaded: LoadedModel,
    facts: Sequence[TraceFact],
    *,
    model_id: str | None = None,
    window: int | None = None,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    min_pairs: int = DEFAULT_MIN_PAIRS,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> LocateResult:
    """Trace recall on ``facts`` and choose the key position and hook layers."""
    start = time.perf_counter()
    evidence = trace_recall(
        loaded.model,
        loaded.tokenizer,
        facts,
        max_pairs=max_pairs,
        min_pairs=min_pairs,
        batch_rows=batch_rows,
    )
    size = default_window(evidence.n_layers) if window is None else window
    kind, layers = choose(evidence, size)
    return LocateResult(
        key_position=kind,
        layers=layers,
        evidence=evidence,
        model_id=model_id or loaded.cache_id,
        fingerprint=model_fingerprint(loaded.model),
        n_pairs=evidence.n_pairs,
        seconds=round(time.perf_counter() - start, 3),
        window=size,
        facts_sha256=facts_sha256(facts),
    )


# --- the cache -----------------------------------------------------------------------


def locate_cache_dir(cache_dir: Path) -> Path:
    """Where results live: ``locate/`` in the editors' cache folder (``var/locate/`` by default)."""
    return cache_dir / "locate"


def _cache_key(
    loaded: LoadedModel, model_id: str, facts: Sequence[TraceFact], max_pairs: int
) -> dict[str, Any]:
    return {
        "version": LOCATE_FORMAT_VERSION,
        "model_id": model_id,
        "fingerprint": model_fingerprint(loaded.model),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "facts_sha256": facts_sha256(facts),
        "max_pairs": max_pairs,
    }


def cache_path(cache_dir: Path | str, key: Mapping[str, Any]) -> Path:
    """``locate-<fingerprint16>-<settings16>.json`` under ``cache_dir``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / f"locate-{key['fingerprint'][:16]}-{digest[:16]}.json"


def _read_cached(path: Path, key: Mapping[str, Any]) -> LocateResult | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("key") != dict(key):
            raise LocateError("computed for other settings (key mismatch)")
        return LocateResult.from_json(data.get("result") or {})
    except (OSError, ValueError, LocateError) as e:
        log.warning("locate_cache_invalidated", path=str(path), reason=str(e))
        return None


def cached_locate(
    cache_dir: Path | str,
    loaded: LoadedModel,
    facts: Sequence[TraceFact],
    *,
    model_id: str | None = None,
    window: int | None = None,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    min_pairs: int = DEFAULT_MIN_PAIRS,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    force: bool = False,
) -> LocateResult:
    """``locate``, reused from ``cache_dir`` when a result for this model and facts exists.

    Logs ``locate_reused`` or ``locate_computed`` (and ``locate_cache_invalidated``
    when a file had to be recomputed). ``force`` recomputes regardless.
    """
    mid = model_id or loaded.cache_id
    key = _cache_key(loaded, mid, facts, max_pairs)
    path = cache_path(cache_dir, key)
    found = None if force else _read_cached(path, key)
    if found is not None:
        result = found if window == found.window else found.rechoose(window)
        log.info(
            "locate_reused",
            path=str(path),
            key_position=result.key_position,
            layers=list(result.layers),
        )
        return result
    result = locate(
        loaded,
        facts,
        model_id=mid,
        window=window,
        max_pairs=max_pairs,
        min_pairs=min_pairs,
        batch_rows=batch_rows,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"key": key, "result": result.to_json()}, indent=2, sort_keys=True)
    atomic_write_text(path, text + "\n")
    log.info(
        "locate_computed",
        path=str(path),
        key_position=result.key_position,
        layers=list(result.layers),
        pairs=result.n_pairs,
        seconds=result.seconds,
    )
    return result


def latest_locate(
    cache_dir: Path | str, loaded: LoadedModel, model_id: str | None = None
) -> LocateResult | None:
    """The newest valid cached result for this model (any facts), or ``None``.

    For an editor whose config leaves the hook layers empty ("chosen by
    ``editd locate``") and that does not know which facts were traced.
    """
    fingerprint = model_fingerprint(loaded.model)
    mid = model_id or loaded.cache_id
    files = sorted(
        Path(cache_dir).glob(f"locate-{fingerprint[:16]}-*.json"),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for path in files:
        try:
            result = LocateResult.from_json(json.loads(path.read_text(encoding="utf-8"))["result"])
        except (OSError, ValueError, KeyError, TypeError, LocateError) as e:
            log.warning("locate_cache_invalidated", path=str(path), reason=str(e))
            continue
        if result.fingerprint == fingerprint and result.model_id == mid:
            return result
    return None
