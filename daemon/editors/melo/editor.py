"""The MELO editor: edits trained into routed LoRA blocks, selected per request by a key index.

:class:`MeloEditor` builds its parts on one live model: block LoRA on ``layers``
(``layer``), the key reader at ``key_layer`` (``keys``), the inline router
(``routing``), the block table (``allocator``), the neuron index (``index``) and
the applied edits with their prompts' keys.

Applying a batch (``apply``):

1. **Check** each edit (``verify``): token counts, clashes inside the batch and
   with applied edits. Refusals carry a reason; refused edits leave no trace.
2. **Group** the accepted edits ``edits_per_block`` at a time; each group gets
   the lowest free block of the ``BlockTable`` (a full table refuses the group
   with the ``BlockCapacityError`` text and logs ``melo_block_table_full``).
   With subject keys a subject has one block: each edit is a group of its own, and
   an edit of an applied subject joins that subject's block (``BlockTable.join``),
   which is trained again on all of its edits; if the new edit is refused, the
   block gets back its weights.
3. **Train** the block (seed ``config.seed + block``) with every row of the group
   (prompts and, when sent, rephrases) routed to it, until each row greedy-decodes
   its target (teacher-forced argmax, not run on into a longer word) with a mean
   NLL of at most ``stop_nll``, or ``max_steps`` (``training``).
4. **Index and verify**, as one transaction on the neuron index (``begin`` /
   ``commit`` / ``rollback``: an undo journal, not a copy of the index): insert
   the keys of the group's prompts and rephrases (``keys``; with subject keys also
   the subject's keys in ``SUBJECT_FRAMES``, clustered by subject, not by target),
   then check by real greedy generation under ``routing`` (``continuation_matches``)
   the new edits, the other edits of a retrained block, and every applied edit
   whose prompt now routes differently (a key can JOIN
   another block's cluster, a split can displace keys). Edits that fail are
   dropped, the insert rolled back and the rest inserted again; if an applied
   edit would break, the whole group is refused. A refused edit leaves the index
   exactly as it was (``to_state()`` byte for byte).

Reach (``EditSpec.reach``, subject keys only): an edit of reach ``"subject"`` is keyed
at its subject, so every prompt naming the subject routes to it. An edit of reach
``"prompt"`` (and any edit without a subject) is keyed where its prompt's text ends
(:meth:`MeloEditor._key_span`), its keys have their own radius (``prompt_radius``, or
half the spread of its own phrasings' keys when it sends rephrases that lie farther
apart; ``NeuronIndex.add(..., radius=)``), it has a block of its own, and a request routes to
it only when the request also names its subject: its own question in other framings,
not the subject's other questions (at the key layer, another question about the same
person lies CLOSER to a question's end key than the same question in another frame
does; BENCHMARKS.md "Forget and behaviour edits", session 15).

Retracting drops the edits' keys, releases them in the table and clears freed
blocks (with subject keys a block that keeps other edits is trained again on them); a
cluster still holding other edits' keys is pointed at a live block
(``NeuronIndex.reassign_blocks``). A retracted prompt that no other cluster
routes runs the base model: bit-identical logits.

Serving (``routing``): the prompts' keys are looked up once per request, from
the key layer's output in the request's own prefill (``InlineRouter``; up front by
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

import dataclasses
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

from daemon.editors.base import EditOutcome, EditSpec
from daemon.editors.melo import calibration, verify
from daemon.editors.melo import layer as blocks
from daemon.editors.melo import state as melo_state
from daemon.editors.melo.allocator import BlockTable
from daemon.editors.melo.config import MeloConfig
from daemon.editors.melo.index import NeuronIndex, Route, pairwise_sq
from daemon.editors.melo.keys import F32, KeyReader, KeyTable, span_keys, unit_keys
from daemon.editors.melo.routing import InlineRouter, route_rows
from daemon.editors.melo.training import TrainResult, TrainSettings, train_block
from daemon.errors import BlockCapacityError, ConfigError, EditorStateError
from daemon.model import arch
from daemon.model.batches import PromptTargetBatch, encode_prompt_target
from daemon.model.chat import chat_suffix, user_text_end
from daemon.model.tokens import TokenGram, subject_grams

log = structlog.get_logger()


STATE_VERSION = melo_state.STATE_VERSION
DEFAULT_STOP_NLL = 0.02
"""Train each block until every row's mean target NLL is at most this (p ~ 0.98), not
merely until the target is the argmax: rephrases routed to the block then answer the
target far more often, for a little more training per edit."""
_CONFIG_KEY = "editors.melo"
SUBJECT_FRAMES = ("{}", "The {}", "Tell me about {}", "Here is a fact about {}")
"""Contexts in which an edit's subject key is also read (subject keys), besides its prompt."""
SUBJECT_RADIUS = 0.5
"""The routing radius with ``key_position = "subject_last"`` and ``radius = 0`` (L2
between unit keys: cosine >= 0.875): between how near a rephrase's subject key lies to
its edit prompt's and how near the nearest OTHER record's subject key does, as
``bench/melo_keys.py`` measures them at the default key layer."""


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


def spread_of(keys: Sequence[F32]) -> float:
    """The largest L2 distance between two of ``keys`` (0 for fewer than two)."""
    if len(keys) < 2:
        return 0.0
    mat = np.stack(keys).astype(np.float64)
    return float(np.sqrt(pairwise_sq(mat, mat).max()))


def _ends_with(ids: Sequence[int], pos: int, grams: frozenset[TokenGram]) -> bool:
    """Whether one of ``grams`` ends at ``ids[pos]``."""
    return any(len(g) <= pos + 1 and tuple(ids[pos + 1 - len(g) : pos + 1]) == g for g in grams)


class MeloEditor:
    """MELO on one live model: block LoRA on ``layers``, a neuron index over prompt keys."""

    name = "melo"

    @property
    def reads_subjects(self) -> bool:
        """Subject keys: any prompt token where an edit's subject ends routes to its block."""
        return self.config.key_position == "subject_last"

    def keyed_at_subject(self, spec: EditSpec) -> bool:
        """Whether the spec's keys sit at its subject: subject keys, a subject, and reach
        ``"subject"``; otherwise they sit where its texts end (:meth:`_key_span`)."""
        return (
            self.reads_subjects
            and spec.reach == "subject"
            and bool(spec.subject and spec.subject.strip())
        )

    def subject_name(self, spec: EditSpec) -> str:
        """What groups edits into one block with subject keys: the subject, or for an edit
        not keyed at its subject the prompt (a block of its own)."""
        if self.keyed_at_subject(spec):
            return (spec.subject or "").strip()
        return spec.prompt.strip()

    def key_texts(self, spec: EditSpec) -> list[str]:
        """The texts whose keys route to the spec's block: its prompt and rephrases, and
        keyed at a subject also the subject in ``SUBJECT_FRAMES`` (what precedes a subject
        moves its key: "Kharkiv is a twin city of" against "The twin city of Kharkiv is")."""
        texts = verify.edit_prompts(spec)
        if self.keyed_at_subject(spec):
            texts += [frame.format((spec.subject or "").strip()) for frame in SUBJECT_FRAMES]
        return list(dict.fromkeys(texts))

    def key_radius(self, spec: EditSpec, keys: Mapping[str, F32]) -> float | None:
        """The spec's keys' own radius, for an edit keyed where its text ends under subject
        keys: ``prompt_radius``, or half the largest distance between its own texts' keys
        (``keys``) when that is wider: the rephrases a client sends say how far apart
        phrasings of the edit lie. None (the index's radius) for the other edits."""
        if not self.reads_subjects or self.keyed_at_subject(spec):
            return None
        return max(
            self.config.prompt_radius, spread_of([keys[t] for t in self.key_texts(spec)]) / 2
        )

    def training_batch(self, specs: Sequence[EditSpec]) -> PromptTargetBatch:
        """The block's training rows for ``specs``: prompts and rephrases with their targets,
        on the model's device."""
        rows = [(p, self.trained_target(s)) for s in specs for p in verify.edit_prompts(s)]
        batch = encode_prompt_target(self.tokenizer, [p for p, _ in rows], [t for _, t in rows])
        return batch.to(next(self.model.parameters()).device)

    def trained_target(self, spec: EditSpec) -> str:
        """The text a block learns after the spec's prompts: its target, followed by the
        end-of-sequence token when the target is the whole reply (``whole_reply``, or a
        chat prompt's target: the assistant's whole turn). The block stays active for the
        whole generation: without it a short answer would be said again and again."""
        eos = self.tokenizer.eos_token
        ends = spec.whole_reply or user_text_end(spec.prompt, self._chat_suffix) is not None
        return spec.target + eos if ends and isinstance(eos, str) and eos else spec.target

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
        self._chat_suffix = chat_suffix(tokenizer)
        self.config = config
        self.layers, self.key_layer = resolve_layers(model, config)
        self.calibration_prompts = tuple(calibration_prompts)
        self.radius_fraction = radius_fraction
        self.max_target_tokens = max_target_tokens
        self.verify_batch_size = verify_batch_size
        self.context = verify.model_context(getattr(model, "config", None))
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
        # reach "prompt" edits with a subject: the subject's token n-grams a request must name
        self._named: dict[str, frozenset[TokenGram]] = {}
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
        n-grams, ``subject_grams``), for an edit of reach ``"prompt"`` only if the prompt
        also names its subject; None when no such token."""
        best: Route | None = None
        for pos, route in enumerate(index.query(keys)):
            if route is None or (best is not None and route.distance >= best.distance):
                continue
            if any(self._routes_at(e, ids, pos) for e in self.table.edits_in(route.block)):
                best = route
        return None if best is None else best.block

    def _routes_at(self, edit_id: str, ids: Sequence[int], pos: int) -> bool:
        """Whether token ``pos`` of ``ids`` is where ``edit_id``'s key is read, in a prompt
        that names its subject when it must."""
        if not _ends_with(ids, pos, self._subject_grams.get(edit_id, frozenset())):
            return False
        named = self._named.get(edit_id)
        return named is None or any(_ends_with(ids, end, named) for end in range(len(ids)))

    def _remember_subjects(self, specs: Sequence[EditSpec]) -> None:
        """Where each spec's keys are read, as token n-grams that must end there: its
        subject's tokens when keyed at its subject; else the last token of each key
        text's :meth:`_key_span` (so the radius alone decides), and for a spec with a
        subject, its subject's n-grams, which a request must name (``_named``)."""
        for spec in specs:
            named = (
                subject_grams(self.tokenizer, spec.subject, spec.prompt)
                if spec.subject and spec.subject.strip()
                else frozenset()
            )
            if self.keyed_at_subject(spec):
                self._subject_grams[spec.edit_id] = named
                continue
            ends = [
                self.tokenizer(self._key_span(text), add_special_tokens=False)["input_ids"]
                for text in self.key_texts(spec)
            ]
            self._subject_grams[spec.edit_id] = frozenset((int(ids[-1]),) for ids in ends if ids)
            if named:
                self._named[spec.edit_id] = named

    def _key_span(self, text: str) -> str:
        """The part of a subjectless edit's text whose last token carries its key: the
        text up to the end of the user's turn when it is a chat prompt (every chat
        prompt ends with the same template tokens, whose keys say little about the
        question and would route every chat prompt alike), else the whole text (its
        last token, whitespace included: a stripped text would end a token early)."""
        return user_text_end(text, self._chat_suffix) or text

    def _key_subject(self, spec: EditSpec, text: str) -> str | None:
        """What :class:`KeyReader` reads ``text``'s key at: the spec's subject (keyed at
        it), else the end of the user's turn of a chat prompt, else (None) its last token."""
        if self.keyed_at_subject(spec):
            return spec.subject
        return user_text_end(text, self._chat_suffix)

    # --- the Editor protocol: writes ----------------------------------------------------

    def apply(self, edits: Sequence[EditSpec]) -> list[EditOutcome]:
        if not edits:
            return []
        with self._write_lock:
            t0 = time.perf_counter()
            outcomes: dict[int, EditOutcome] = {}
            accepted = self._check(edits, outcomes)
            if accepted:
                self.calibrate()
                keys = self._keys_by_edit(accepted)
                for group in self._groups(accepted):
                    for spec, outcome in zip(group, self._apply_group(group, keys), strict=True):
                        outcomes[self._position(edits, spec)] = outcome
            result = [outcomes[i] for i in range(len(edits))]
            log.info(
                "melo_batch_applied",
                batch=len(edits),
                accepted=sum(o.accepted for o in result),
                seconds=round(time.perf_counter() - t0, 4),
                **self.stats(),
            )
            return result

    def retract(self, edit_ids: Sequence[str]) -> None:
        ids = list(dict.fromkeys(edit_ids))
        with self._write_lock:
            unknown = [e for e in ids if e not in self._specs]
            if unknown:
                raise EditorStateError(
                    f"melo cannot retract unknown edit ids {unknown}", edit_ids=unknown
                )
            if not ids:
                return
            assert self.index is not None  # applied edits imply an index
            trial = self.index.copy()
            trial.remove(ids)
            touched = {self.table.block_of(e) for e in ids}
            freed = self.table.release_edits(ids)
            moves = trial.reassign_blocks(freed)
            self.index = trial
            for block in freed:
                blocks.clear_block(self.installed, block)
            for edit_id in ids:
                del self._specs[edit_id]
                self._subject_grams.pop(edit_id, None)
                self._named.pop(edit_id, None)
                del self._prompt_keys[edit_id]
            log.info("melo_edits_retracted", edit_ids=ids, freed_blocks=freed, reassigned=moves)
            if self.reads_subjects:  # a subject's block still holds the retracted fact
                for block in sorted(b for b in touched if b is not None and b not in freed):
                    self._retrain(block)
            if moves:
                moved = {cid for cid, _, _ in moves}
                members = {
                    e for cid, c in trial.clusters().items() if cid in moved for e in c.edit_ids
                }
                self._report_regressions(sorted(members & set(self._specs)), "retract")

    # --- checks ------------------------------------------------------------------------

    @staticmethod
    def _position(edits: Sequence[EditSpec], spec: EditSpec) -> int:
        return next(i for i, e in enumerate(edits) if e is spec)

    def _check(self, edits: Sequence[EditSpec], out: dict[int, EditOutcome]) -> list[EditSpec]:
        """Refuse (into ``out``) what cannot be applied; return the rest, in order."""
        reasons: dict[int, str] = {}
        seen: set[str] = set()
        for i, spec in enumerate(edits):
            if spec.edit_id in self._specs:
                reasons[i] = "edit id is already applied (retract it first)"
            elif spec.edit_id in seen:
                reasons[i] = "edit id occurs twice in the batch"
            else:
                reason = verify.size_reason(
                    self.tokenizer,
                    dataclasses.replace(spec, target=self.trained_target(spec)),
                    max_target_tokens=self.max_target_tokens,
                    context=self.context,
                )
                if reason is not None:
                    reasons[i] = reason
            seen.add(spec.edit_id)
        candidates = [s for i, s in enumerate(edits) if i not in reasons]
        applied = {
            text: (s.edit_id, s.target)
            for s in self._specs.values()
            for text in verify.edit_prompts(s)
        }
        clashes = verify.conflict_reasons(candidates, applied)
        for i, spec in enumerate(edits):
            if i not in reasons and spec.edit_id in clashes:
                reasons[i] = clashes[spec.edit_id]
        for i, reason in reasons.items():
            out[i] = self._refuse(edits[i].edit_id, reason)
        return [s for i, s in enumerate(edits) if i not in reasons]

    @staticmethod
    def _refuse(edit_id: str, reason: str) -> EditOutcome:
        log.info("melo_edit_refused", edit_id=edit_id, reason=reason)
        return EditOutcome(edit_id, accepted=False, reason=reason)

    # --- one group ----------------------------------------------------------------------

    def _groups(self, accepted: Sequence[EditSpec]) -> list[list[EditSpec]]:
        """The groups trained together: ``edits_per_block`` at a time, or with subject keys
        one edit at a time (an edit of an applied subject retrains that subject's block)."""
        if self.reads_subjects:
            return [[spec] for spec in accepted]
        size = self.config.edits_per_block
        return [list(accepted[i : i + size]) for i in range(0, len(accepted), size)]

    def _subject_block(self, spec: EditSpec) -> int | None:
        """With subject keys, the block of an applied edit of ``spec``'s subject, else None."""
        if not self.reads_subjects:
            return None
        name = self.subject_name(spec)
        for applied in self._specs.values():
            if self.subject_name(applied) == name:
                return self.table.block_of(applied.edit_id)
        return None

    def _apply_group(self, group: Sequence[EditSpec], keys: Mapping[str, F32]) -> list[EditOutcome]:
        ids = [s.edit_id for s in group]
        shared = self._subject_block(group[0])
        members = [] if shared is None else [self._specs[e] for e in self.table.edits_in(shared)]
        before = None if shared is None else blocks.block_state(self.installed, shared)
        try:
            if shared is None:
                block = self.table.allocate(ids)
            else:
                block = shared
                self.table.join(block, ids)
        except BlockCapacityError as exc:
            log.warning("melo_block_table_full", edit_ids=ids, **self.stats())
            return [self._refuse(e, str(exc)) for e in ids]
        t0 = time.perf_counter()
        try:
            steps, reasons = self._train_and_insert(group, block, keys, members)
        except BaseException:  # Shutdown included: leave no half-applied group behind
            self._undo_group(block, ids, before)
            raise
        if reasons and before is not None:  # one edit per group: the block as it was
            self._undo_group(block, ids, before)
        elif reasons:
            for freed in self.table.release_edits(list(reasons)):
                blocks.clear_block(self.installed, freed)
        details = {"block": block, "steps": steps, "seconds": round(time.perf_counter() - t0, 4)}
        outcomes = []
        for spec in group:
            if spec.edit_id in reasons:
                outcomes.append(self._refuse(spec.edit_id, reasons[spec.edit_id]))
                continue
            self._specs[spec.edit_id] = spec
            self._prompt_keys[spec.edit_id] = keys[spec.prompt]
            log.info("melo_edit_applied", edit_id=spec.edit_id, **details)
            outcomes.append(EditOutcome(spec.edit_id, accepted=True, details=details))
        return outcomes

    def _undo_group(
        self, block: int, ids: Sequence[str], before: Mapping[str, torch.Tensor] | None
    ) -> None:
        """Take the group's edits out of ``block``: free it, or give it back its weights."""
        if before is None:
            if self.table.edits_in(block):
                self.table.free(block)
            blocks.clear_block(self.installed, block)
            return
        joined = [e for e in ids if self.table.block_of(e) == block]
        if joined:
            self.table.release_edits(joined)
        blocks.load_block_state(self.installed, block, before)

    def _train_and_insert(
        self,
        group: Sequence[EditSpec],
        block: int,
        keys: Mapping[str, F32],
        members: Sequence[EditSpec] = (),
    ) -> tuple[int, dict[str, str]]:
        """Train ``block`` on the group (and the edits already in it, ``members``), then
        index and verify; steps and refusal reasons. The members must still verify."""
        specs = [*members, *group]
        trained = self._train(block, specs)
        prompts = [p for s in specs for p in verify.edit_prompts(s)]
        hit = dict(zip(prompts, trained.row_hits, strict=True))
        reasons = {
            s.edit_id: f"training did not reach the target in {trained.steps} steps "
            f"(loss {trained.loss:.3f})"
            for s in group
            if not hit[s.prompt]
        }
        broken = [s.edit_id for s in members if not hit[s.prompt]]
        if broken:
            reason = f"would break applied edits {broken} (their block is retrained)"
            return trained.steps, {s.edit_id: reason for s in group}
        trained_specs = [s for s in group if s.edit_id not in reasons]
        reasons.update(self._insert_verified(trained_specs, block, keys, members)[1])
        return trained.steps, reasons

    def _insert_verified(
        self,
        specs: Sequence[EditSpec],
        block: int,
        keys: Mapping[str, F32],
        members: Sequence[EditSpec] = (),
    ) -> tuple[list[EditSpec], dict[str, str]]:
        """Insert the specs' keys into the live index until every routed edit verifies.

        Returns the edits now live and a reason per edit refused. Each attempt is an
        insert transaction, committed only when the new edits, the applied edits of a
        retrained block (``members``) and every applied edit whose route changed pass
        greedy verification, else rolled back.
        """
        index = self.index
        assert index is not None
        fresh = [keys[t] for s in specs for t in self.key_texts(s)]
        watched = verify.watch_routes(index, self._prompt_keys, fresh)
        pending, reasons = list(specs), {}
        while pending:
            index.begin()
            try:
                conflicts, displaced = verify.insert_keys(
                    index,
                    pending,
                    block,
                    keys,
                    texts=self.key_texts,
                    label=self.route_label,
                    radius=lambda spec: self.key_radius(spec, keys),
                )
                reasons.update(conflicts)
                pending = [s for s in pending if s.edit_id not in conflicts]
                moved = self._rerouted(index, watched) | (displaced & set(self._specs))
                moved |= {s.edit_id for s in members}
                failures = self._verify([*pending, *(self._specs[e] for e in sorted(moved))])
            except BaseException:
                index.rollback()
                raise
            broken = sorted(e for e in failures if e in self._specs)
            if broken:
                index.rollback()
                reason = f"would break applied edits {broken} (their prompts re-route)"
                reasons.update({s.edit_id: reason for s in pending})
                return [], reasons
            if not any(s.edit_id in failures for s in pending):
                index.commit()
                return pending, reasons
            index.rollback()
            for s in pending:
                if s.edit_id in failures:
                    reasons[s.edit_id] = f"verification failed: got {failures[s.edit_id]!r}"
            pending = [s for s in pending if s.edit_id not in failures]
        return [], reasons

    def _train(self, block: int, specs: Sequence[EditSpec]) -> TrainResult:
        """Initialise ``block`` (seed ``config.seed + block``) and train it on ``specs``."""
        blocks.init_block(self.installed, block, self.config.seed + block)
        return train_block(
            self.model,
            self.tokenizer,
            self.installed,
            block,
            self.training_batch(specs),
            self.train_settings,
            first_layer=min(self.layers),
        )

    def _retrain(self, block: int) -> None:
        """Train ``block`` again on the edits left in it (after a retraction)."""
        specs = [self._specs[e] for e in self.table.edits_in(block)]
        trained = self._train(block, specs)
        log.info("melo_block_retrained", block=block, edits=len(specs), steps=trained.steps)
        self._report_regressions([s.edit_id for s in specs], "retract")

    def _rerouted(self, index: NeuronIndex, watched: verify.WatchedRoutes) -> set[str]:
        return verify.rerouted(index, watched)

    def _verify(self, specs: Sequence[EditSpec]) -> dict[str, str]:
        """Greedy-generate each spec's prompt under routing; edit id -> text, failures only."""
        return verify.generation_failures(
            self.model, self.tokenizer, self.routing, specs, batch_size=self.verify_batch_size
        )

    def _report_regressions(self, edit_ids: Sequence[str], cause: str) -> None:
        if not edit_ids:
            return
        for edit_id, text in self._verify([self._specs[e] for e in edit_ids]).items():
            log.warning("melo_edit_regressed", edit_id=edit_id, cause=cause, got=text)

    # --- keys ---------------------------------------------------------------------------

    def _keys_by_edit(self, specs: Sequence[EditSpec]) -> dict[str, F32]:
        """Each edit text's key: at its last token, or (``key_position = "subject_last"``)
        at the last token of the edit's subject where the text names it."""
        subject_of = {t: self._key_subject(s, t) for s in specs for t in self.key_texts(s)}
        texts = list(subject_of)
        if self.config.key_position != "subject_last":
            return dict(zip(texts, self.keys(texts), strict=True))
        self._remember_subjects(specs)
        subjects = [subject_of[t] for t in texts]
        return dict(zip(texts, self.keys(texts, subjects), strict=True))

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
            self._subject_grams, self._named = {}, {}
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
