"""The MELO editor's base: its parts on a live model, serving, the radius and the state.

:class:`MeloEditorBase` builds the parts of a MELO editor: block LoRA on ``layers``
(``layer``), the key reader at ``key_layer`` (``keys``), the inline router, the
block table, the neuron index and the applied edits with their prompts' keys.
It holds all of the editor but its two writes, ``apply`` and ``retract``, which
its subclass ``editor.MeloEditor`` adds: serving, the radius, stats and the state.

Serving (``routing``): the prompts' keys are looked up once per request, from
the key layer's output in the request's own prefill (``inline``; up front by
``KeyReader`` when the batch's layout does not allow it), and frozen for every
decode step (a context variable, so concurrent requests in other threads keep
their own routes). Each lookup holds the index's lock, so it sees the index
before or after a batch of keys; a request in another thread during ``apply`` may
see the keys being verified (the daemon's ``Engine`` lock keeps requests and
edits apart anyway).

The radius: ``config.radius > 0`` wins; otherwise it is calibrated once, lazily
at the first ``apply`` (or up front by ``calibrate()``), by the rule in
``calibration`` (a fixed-size bank of the given ``calibration_prompts`` topped up
with prompts sampled from the model).

The state dict (``state_dict`` / ``load_state_dict``; on disk ``save`` / ``load``)
is laid out in ``state``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from daemon.editors.base import EditSpec
from daemon.editors.melo import calibration, checks
from daemon.editors.melo import layer as blocks
from daemon.editors.melo import state as melo_state
from daemon.editors.melo.allocator import BlockTable
from daemon.editors.melo.config import MeloConfig
from daemon.editors.melo.index import NeuronIndex
from daemon.editors.melo.index_records import Route
from daemon.editors.melo.inline import InlineRouter
from daemon.editors.melo.key_table import KeyTable
from daemon.editors.melo.keys import F32, KeyReader, span_keys, unit_keys
from daemon.editors.melo.routing import route_rows
from daemon.editors.melo.training import TrainSettings
from daemon.errors import ConfigError, EditorStateError
from daemon.model import arch
from daemon.model.batches import PromptTargetBatch, encode_prompt_target
from daemon.model.tokens import TokenGram, subject_grams

log = structlog.get_logger()

STATE_VERSION = melo_state.STATE_VERSION
DEFAULT_STOP_NLL = 0.02
"""Train each block until every row's mean target NLL is at most this (p ~ 0.98), not
merely until the target is the argmax: on the small world (100 edits, no rephrases
sent) rephrases routed to the block then answer the target 98% of the time instead
of 73% (paraphrase 0.59 -> 0.80 at the same radius) for ~0.02 s more per edit."""
_CONFIG_KEY = "editors.melo"
SUBJECT_FRAMES = ("{}", "The {}", "Tell me about {}", "Here is a fact about {}")
"""Contexts in which an edit's subject key is also read (subject keys), besides its prompt."""
SUBJECT_RADIUS = 0.5
"""The routing radius with ``key_position = "subject_last"`` and ``radius = 0`` (L2
between unit keys: cosine >= 0.875). SmolLM2-135M, CounterFact 0-299, keys at block 10
of 30, the default key layer (``bench/melo_keys.py``): a rephrase's subject key lies at
cosine >= 0.907 of the edit prompt's in 90% of records (median 0.978); the nearest OTHER
record's subject key at cosine <= 0.868 in 90% (median 0.802)."""


def resolve_layers(model: PreTrainedModel, config: MeloConfig) -> tuple[tuple[int, ...], int]:
    """The LoRA layers and the key layer; ConfigError when the key layer is not below them."""
    n_layers = arch.num_layers(model)
    layers = tuple(sorted(set(config.layers))) or arch.default_melo_layers(model)
    bad = [i for i in layers if i >= n_layers]
    if bad:
        raise ConfigError(
            f"layers {bad} out of range for a {n_layers}-layer model", key=f"{_CONFIG_KEY}.layers"
        )
    if config.key_layer >= 0:
        key_layer = config.key_layer
    elif config.key_position == "subject_last":
        key_layer = min(arch.num_layers(model) // 3, max(0, layers[0] - 1))
    else:
        key_layer = arch.default_key_layer(model)
    if key_layer >= layers[0]:
        raise ConfigError(
            f"key_layer {key_layer} must lie below the lowest LoRA layer {layers[0]} "
            "(keys must not depend on the blocks they select)",
            key=f"{_CONFIG_KEY}.key_layer",
        )
    return layers, key_layer


def _blocks_of(index: NeuronIndex, keys: F32) -> list[int | None]:
    return [None if r is None else r.block for r in index.query(keys)]


def _last_token_lookup(
    index: NeuronIndex,
    hidden: torch.Tensor,
    _ids: torch.Tensor,
    _starts: torch.Tensor,
    ends: torch.Tensor,
) -> list[int | None]:
    return _blocks_of(index, unit_keys(hidden, ends))


def _ends_with(ids: Sequence[int], pos: int, grams: frozenset[TokenGram]) -> bool:
    """Whether one of ``grams`` ends at ``ids[pos]``."""
    return any(len(g) <= pos + 1 and tuple(ids[pos + 1 - len(g) : pos + 1]) == g for g in grams)


class MeloEditorBase:
    """A MELO editor's parts on one live model, and all of it but ``apply`` and ``retract``."""

    name = "melo"

    @property
    def reads_subjects(self) -> bool:
        """Subject keys: any prompt token where an edit's subject ends routes to its block."""
        return self.config.key_position == "subject_last"

    def subject_name(self, spec: EditSpec) -> str:
        """What groups edits into one block with subject keys: the subject (or prompt)."""
        return (spec.subject or spec.prompt).strip()

    def key_texts(self, spec: EditSpec) -> list[str]:
        """The texts whose keys route to the spec's block: its prompt and rephrases, and
        with subject keys its subject in ``SUBJECT_FRAMES`` (what precedes a subject moves
        its key: "Kharkiv is a twin city of" against "The twin city of Kharkiv is")."""
        texts = checks.edit_prompts(spec)
        if self.reads_subjects and spec.subject and spec.subject.strip():
            texts += [frame.format(spec.subject.strip()) for frame in SUBJECT_FRAMES]
        return list(dict.fromkeys(texts))

    def training_batch(self, specs: Sequence[EditSpec]) -> PromptTargetBatch:
        """The block's training rows for ``specs``: prompts and rephrases with their targets,
        on the model's device."""
        rows = [(p, s.target) for s in specs for p in checks.edit_prompts(s)]
        batch = encode_prompt_target(self.tokenizer, [p for p, _ in rows], [t for _, t in rows])
        return batch.to(next(self.model.parameters()).device)

    def route_label(self, spec: EditSpec) -> str:
        """What the index clusters a spec's keys by: its target, or with subject keys its
        subject (one subject's keys share a cluster and a block, whatever their targets)."""
        return f"subject:{self.subject_name(spec)}" if self.reads_subjects else spec.target

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: MeloConfig,
        *,
        calibration_prompts: Sequence[str] = (),
        radius_fraction: float = calibration.DEFAULT_FRACTION,
        max_target_tokens: int = 16,
        stop_nll: float = DEFAULT_STOP_NLL,
        verify_batch_size: int = 32,
    ) -> None:
        if radius_fraction <= 0 or max_target_tokens < 1 or verify_batch_size < 1:
            raise ValueError("radius_fraction > 0, max_target_tokens >= 1, verify_batch_size >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.layers, self.key_layer = resolve_layers(model, config)
        self.calibration_prompts = tuple(calibration_prompts)
        self.radius_fraction = radius_fraction
        self.max_target_tokens = max_target_tokens
        self.verify_batch_size = verify_batch_size
        self.context = checks.model_context(getattr(model, "config", None))
        self.train_settings = TrainSettings(config.learning_rate, config.max_steps, stop_nll)
        self.installed = blocks.install_block_lora(
            model, self.layers, config.max_blocks, config.rank_per_block
        )
        try:
            self.keys = KeyReader(model, tokenizer, self.key_layer)
            self.inline = self._inline_router()
        except BaseException:
            blocks.remove_block_lora(model, self.installed)
            raise
        self.table = BlockTable(config.max_blocks)
        self.index: NeuronIndex | None = None
        self._specs: dict[str, EditSpec] = {}  # applied edits, in applied order
        self._prompt_keys = KeyTable(self.keys.dim)  # edit id -> key of its prompt (d,)
        self._subject_grams: dict[str, frozenset[TokenGram]] = {}  # subject_last routing
        self._write_lock = threading.RLock()
        log.info(
            "melo_editor_ready",
            layers=list(self.layers),
            key_layer=self.key_layer,
            capacity=config.max_blocks,
            bytes_per_block=blocks.block_memory_bytes(self.installed),
        )

    def close(self) -> None:
        """Remove the LoRA layers and the key hook: the model is the base model again."""
        if self.inline is not None:
            self.inline.close()
        self.keys.close()
        blocks.remove_block_lora(self.model, self.installed)

    def _inline_router(self) -> InlineRouter | None:
        """Routes decided in the request's own prefill; None (keys up front) if not possible."""
        if self.key_layer >= min(self.layers):
            return None
        by_subject = self.config.key_position == "subject_last"
        return InlineRouter(
            self.model,
            self.tokenizer,
            self.key_layer,
            lookup=self._subject_lookup if by_subject else _last_token_lookup,
            up_front=self._route_blocks,
        )

    def _subject_lookup(
        self,
        index: NeuronIndex,
        hidden: torch.Tensor,
        ids: torch.Tensor,
        starts: torch.Tensor,
        ends: torch.Tensor,
    ) -> list[int | None]:
        spans = zip(starts.tolist(), ends.tolist(), strict=True)
        return [
            self._subject_route(index, span_keys(hidden[row], s, e), ids[row, s : e + 1].tolist())
            for row, (s, e) in enumerate(spans)
        ]

    def _subject_route(self, index: NeuronIndex, keys: F32, ids: Sequence[int]) -> int | None:
        """One prompt's block by subject keys: among its tokens whose key is within reach
        of a stored key, the nearest one at which that edit's subject ends (its token
        n-grams, ``subject_grams``); None when no such token."""
        best: Route | None = None
        for pos, route in enumerate(index.query(keys)):
            if route is None or (best is not None and route.distance >= best.distance):
                continue
            edits = self.table.edits_in(route.block)
            if any(_ends_with(ids, pos, self._subject_grams.get(e, frozenset())) for e in edits):
                best = route
        return None if best is None else best.block

    def _remember_subjects(self, specs: Sequence[EditSpec]) -> None:
        """The token n-grams that name each spec's subject (its prompt, if it has none)."""
        for spec in specs:
            self._subject_grams[spec.edit_id] = subject_grams(
                self.tokenizer, spec.subject or spec.prompt, spec.prompt
            )

    # --- serving ------------------------------------------------------------------------

    def applied_ids(self) -> list[str]:
        return list(self._specs)

    def routing(self, prompts: Sequence[str]) -> AbstractContextManager[None]:
        return self._routing(list(prompts))

    @contextmanager
    def _routing(self, prompts: list[str]) -> Iterator[None]:
        index = self.index  # lookups lock the index: never seen half-way through a batch
        if index is None or index.key_count == 0 or self.inline is None:
            with route_rows(self._route_blocks(index, prompts)):
                yield
        else:
            with self.inline.routing(prompts, index):  # decided by the prefill's key layer
                yield

    def route_blocks(self, prompts: Sequence[str]) -> list[int | None]:
        """The block each prompt routes to (None: base model), from the live index."""
        return self._route_blocks(self.index, prompts)

    def _route_blocks(self, index: NeuronIndex | None, prompts: Sequence[str]) -> list[int | None]:
        if index is None or index.key_count == 0:
            return [None] * len(prompts)
        if self.config.key_position == "subject_last":
            rows: list[list[int]] = self.tokenizer(list(prompts))["input_ids"]
            keys = self.keys.token_keys(prompts)
            return [self._subject_route(index, k, r) for k, r in zip(keys, rows, strict=True)]
        return _blocks_of(index, self.keys(prompts))

    # --- radius -------------------------------------------------------------------------

    def calibrate(self) -> float:
        """Fix the radius and create the empty index, if not done yet; return the radius.

        ``apply`` calls this lazily; a daemon may call it at start-up (when it has no
        checkpoint to load) so the first edit does not pay for calibration.
        """
        with self._write_lock:
            if self.index is None:
                self.index = self._new_index()
            return self.index.radius

    def _new_index(self) -> NeuronIndex:
        radius = self.config.radius
        if radius <= 0 and self.config.key_position == "subject_last":
            radius = SUBJECT_RADIUS
        if radius <= 0:
            t0 = time.perf_counter()
            bank = calibration.calibration_bank(
                self.model, self.tokenizer, self.calibration_prompts, seed=self.config.seed
            )
            radius = calibration.radius_from_keys(self.keys(bank), self.radius_fraction)
            log.info(
                "melo_radius_calibrated",
                radius=radius,
                bank=len(bank),
                given=len(self.calibration_prompts),
                key_layer=self.key_layer,
                seconds=round(time.perf_counter() - t0, 3),
            )
        return NeuronIndex(self.keys.dim, radius=radius, exact_max=self.config.exact_index_max)

    # --- introspection --------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Blocks used/free/capacity, bytes per block, keys, clusters, radius, approximate."""
        index = self.index
        return {
            "edits": len(self._specs),
            "blocks_used": self.table.used,
            "blocks_free": self.table.free_count,
            "capacity": self.table.capacity,
            "bytes_per_block": blocks.block_memory_bytes(self.installed),
            "keys": 0 if index is None else index.key_count,
            "clusters": 0 if index is None else index.cluster_count,
            "radius": None if index is None else index.radius,
            "approximate_index": False if index is None else index.is_approximate,
        }

    # --- state ----------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "key_layer": self.key_layer,
            "capacity": self.table.capacity,
            "rank_per_block": self.config.rank_per_block,
            "dim": self.keys.dim,
            "key_position": self.config.key_position,
        }

    def state_dict(self) -> dict[str, Any]:
        with self._write_lock:
            index = self.index
            tensors: dict[str, torch.Tensor] = {}
            for block in sorted(self.table.snapshot()["blocks"]):
                for name, t in blocks.block_state(self.installed, block).items():
                    tensors[melo_state.block_key(block, name)] = t
            keys = [self._prompt_keys[e] for e in self._specs]
            matrix = np.stack(keys) if keys else np.zeros((0, self.keys.dim), np.float32)
            return {
                "version": STATE_VERSION,
                "editor": self.name,
                "settings": self._settings(),
                "radius": None if index is None else index.radius,
                "table": self.table.to_state(),
                "index": None if index is None else index.to_state(),
                "blocks": tensors,
                "edits": [melo_state.spec_to_dict(s) for s in self._specs.values()],
                "prompt_keys": torch.from_numpy(matrix.copy()),
            }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or state.get("editor") != self.name:
            raise EditorStateError(
                f"expected a melo editor state of version {STATE_VERSION}, got "
                f"editor={state.get('editor')!r} version={state.get('version')!r}"
            )
        ours = self._settings()
        saved = dict(state.get("settings", {}))
        saved.pop("capacity", None)  # a limit, not a shape: blocks are created on demand
        saved.setdefault("key_position", "prompt_last")  # states before key_position existed
        ours.pop("capacity")
        if saved != ours:
            raise EditorStateError(
                f"melo state was saved for other settings {state.get('settings')} "
                f"(this editor: {self._settings()})"
            )
        parsed = melo_state.parse_state(state, self.keys.dim)
        try:
            parsed.table.resize(self.config.max_blocks)
        except ValueError as exc:
            raise EditorStateError(f"melo state does not fit max_blocks: {exc}") from exc
        with self._write_lock:
            for block in self.table.snapshot()["blocks"]:
                blocks.clear_block(self.installed, block)
            for block, tensors in parsed.weights.items():
                blocks.load_block_state(self.installed, block, tensors)
            self.table, self.index = parsed.table, parsed.index
            self._specs = {s.edit_id: s for s in parsed.specs}
            self._subject_grams = {}
            self._remember_subjects(parsed.specs)
            self._prompt_keys = KeyTable(self.keys.dim)
            for edit_id, key in zip(self._specs, parsed.prompt_keys, strict=True):
                self._prompt_keys[edit_id] = key
            log.info("melo_state_loaded", **self.stats())

    def save(self, directory: Path | str) -> None:
        """Write the state as safetensors + a JSON manifest (see ``state``), atomically."""
        melo_state.save_state(self.state_dict(), directory)

    def load(self, directory: Path | str) -> None:
        """Load what ``save`` wrote."""
        self.load_state_dict(melo_state.load_state(directory))
