"""The MELO editor: edits trained into routed LoRA blocks, selected per request by a key index.

Applying a batch (``apply``):

1. **Check** each edit (``checks``): token counts, clashes inside the batch and
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

Retracting drops the edits' keys, releases them in the table and clears freed
blocks (with subject keys a block that keeps other edits is trained again on them); a
cluster still holding other edits' keys is pointed at a live block
(``NeuronIndex.reassign_blocks``). A retracted prompt that no other cluster
routes runs the base model: bit-identical logits.

The editor's construction, serving (``routing``), radius calibration, stats and
state dict are in its base class, ``editor_base.MeloEditorBase``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import structlog
import torch

from daemon.editors.base import EditOutcome, EditSpec
from daemon.editors.melo import checks, verify
from daemon.editors.melo import layer as blocks
from daemon.editors.melo.editor_base import MeloEditorBase
from daemon.editors.melo.index import NeuronIndex
from daemon.editors.melo.keys import F32
from daemon.editors.melo.training import TrainResult, train_block
from daemon.errors import BlockCapacityError, EditorStateError

log = structlog.get_logger()


class MeloEditor(MeloEditorBase):
    """MELO on one live model: block LoRA on ``layers``, a neuron index over prompt keys."""

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
                reason = checks.size_reason(
                    self.tokenizer,
                    spec,
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
            for text in checks.edit_prompts(s)
        }
        clashes = checks.conflict_reasons(candidates, applied)
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
        prompts = [p for s in specs for p in checks.edit_prompts(s)]
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
                    index, pending, block, keys, texts=self.key_texts, label=self.route_label
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
        subject_of = {t: s.subject for s in specs for t in self.key_texts(s)}
        texts = list(subject_of)
        if self.config.key_position != "subject_last":
            return dict(zip(texts, self.keys(texts), strict=True))
        self._remember_subjects(specs)
        subjects = [subject_of[t] for t in texts]
        return dict(zip(texts, self.keys(texts, subjects), strict=True))
