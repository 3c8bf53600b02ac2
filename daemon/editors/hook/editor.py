"""The COMEBA-HK editor: gated hook layers holding closed-form, consecutive batch updates.

For a batch of edits (subject, prompt, target):

1. **Validate and merge.** An edit needs a subject in its prompt and a target of
   1..``max_target_tokens`` tokens. Edits of the same fact (same subject and
   relation; the prompt when there is no relation) in one batch are merged when
   their targets agree and all refused when they conflict. An edit of a fact
   already applied supersedes it: the earlier edit is retracted first.
2. **Targets.** v* at the last hook layer's output, optimised jointly for the batch
   (``targets.optimise_targets``).
3. **Spread and solve.** For each hook layer bottom-up (MEMIT's order), keys are
   re-read with the deltas so far, the residual still missing at the last layer is
   divided over the layers not yet updated, and the layer's whole delta is solved
   from running sums ``M = sum t k^T`` and ``S = sum k k^T``::

       delta_l = M_l (lambda C_l + S_l)^-1           (float64, Cholesky, ridge fallback)

   which equals the consecutive update of the issue (see ``math.solve_from_sums``).
   The state is constant in size (``M``, ``S``, the fp32 delta per layer) apart
   from the per-edit records ``(k, t)`` that make retraction exact (and from which
   a load rebuilds ``M`` and ``S``: they are not saved). A shard solved from fewer
   key rows than ``d_out d_in / (d_out + d_in)`` keeps its delta as two factors
   ``T (A^-1 K)^T`` (``math.solve_factors``), smaller than the dense matrix.
   The sums, the covariance and the records live on ``stats_device`` (the model's
   device, or the host: they are needed only to solve), the deltas on the model's.
4. **Shards.** A linear map from ``d_in`` cannot hold many more facts than ``d_in``
   keys, so each hook layer's delta is split into shards of at most ``shard_keys``
   live keys (default ``d_in // 2``); a batch goes to the newest shard and opens a
   new one when it would overflow it. Each shard has its own running sums and
   solve; the scope gate routes a token to the shard of its nearest eligible key.
5. **Scope gate.** The batch's keys join each hook's key set, each with its own
   reference (the distribution of its centred cosine over the calibration text,
   computed once when the key is added), so the delta fires only near an edit's key
   and adding keys never moves the gate of earlier ones. With ``gate_scope =
   "subject"`` (default) a token is scored only against the keys of edits whose
   subject its sequence names (``gate.SubjectScope``, rebuilt from the records, so
   nothing new is persisted) and, with ``gate_snap_keys``, gets the matched key's
   value; ``"key"`` scores it against every key. A **recall check** then
   runs the batch's prompts through the gated model: every key site must be routed
   to the batch's shard at every hook layer, else the batch is refused.
6. **Collapse guard.** ``||delta_l||/||W0||`` and the batch's update norm per
   layer are tracked; a batch whose update norm is an outlier (z-score above
   ``max_update_norm_zscore`` against the history) is refused and rolled back, as
   is a batch whose solve meets NaN/inf or an indefinite system.

A batch is a transaction without copies: sums, shard deltas and gate keys are
replaced, never written into, so the rollback keeps references to the old objects.

Retraction subtracts the edits' ``(k, t)`` terms from their shard's ``M`` and ``S``,
solves that shard again and drops their gate keys with their references; the other
keys' references do not depend on them, so the gate stays as if the edits had
never been applied; their subjects leave the subject index.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from daemon.editors.base import EditOutcome, EditSpec
from daemon.editors.hook.config import HookConfig, HookLayout
from daemon.editors.hook.deltas import frobenius
from daemon.editors.hook.gate import SubjectScope
from daemon.editors.hook.keys import encode_sites
from daemon.editors.hook.layer import HookedProjection, calibrate_gates, install_hooks
from daemon.editors.hook.solve import (
    SolvePlan,
    check_recall,
    resolve_shards,
    solve_layers,
    zero_sums,
)
from daemon.editors.hook.state import (
    READABLE_VERSIONS,
    STATE_VERSION,
    Record,
    check_compatible,
    hook_buffers,
    hook_state,
    load_sums,
    pack_tensors,
    read_state,
    records_manifest,
    shard_rows,
    tensor_sha,
    unpack_records,
    write_state,
)
from daemon.editors.hook.targets import EditText, TargetResult, TargetSettings, optimise_targets
from daemon.errors import EditorStateError, SolveError
from daemon.model import arch
from daemon.model.batches import target_token_ids

log = structlog.get_logger()


# --- what the back-end accepts, and one batch's edits of the same fact ----------------


def fact_key(spec: EditSpec) -> str:
    """What makes two edits "the same fact": subject and relation, else the prompt."""
    if spec.relation and spec.subject:
        return f"{spec.subject.strip().casefold()}\x1f{spec.relation.strip().casefold()}"
    return f"prompt\x1f{spec.prompt.strip()}"


def refusal_reason(
    tokenizer: PreTrainedTokenizerBase, spec: EditSpec, max_target_tokens: int
) -> str | None:
    """Why the hook back-end cannot take ``spec`` (None when it can)."""
    if not spec.subject or not spec.subject.strip():
        return "the hook back-end needs a subject (the router sends such edits to MELO)"
    if spec.subject not in spec.prompt:
        return f"subject {spec.subject!r} does not occur in the prompt"
    n_tokens = len(target_token_ids(tokenizer, spec.prompt, spec.target))
    if n_tokens == 0:
        return "the target tokenises to nothing"
    if n_tokens > max_target_tokens:
        return (
            f"the target has {n_tokens} tokens, more than the hook back-end's limit "
            f"of {max_target_tokens}"
        )
    return None


def merge_batch(
    specs: Sequence[EditSpec],
) -> tuple[list[EditSpec], dict[str, list[str]], dict[str, str]]:
    """``(batch, merged, conflicts)`` of one batch (see the module docstring).

    ``batch`` keeps one spec per fact, ``merged`` maps each kept id to the ids
    merged into it, ``conflicts`` gives each conflicting edit id its reason.
    """
    groups: dict[str, list[EditSpec]] = {}
    for spec in specs:
        groups.setdefault(fact_key(spec), []).append(spec)
    batch: list[EditSpec] = []
    merged: dict[str, list[str]] = {}
    conflicts: dict[str, str] = {}
    for group in groups.values():
        targets = {s.target for s in group}
        if len(targets) > 1:
            ids = [s.edit_id for s in group]
            for s in group:
                conflicts[s.edit_id] = (
                    f"conflicting targets for the same fact in one batch "
                    f"(edits {ids}: {sorted(targets)})"
                )
            continue
        batch.append(group[0])
        merged[group[0].edit_id] = [s.edit_id for s in group[1:]]
    return batch, merged, conflicts


def refuse_all(
    batch: Sequence[EditSpec], merged: Mapping[str, list[str]], reason: str
) -> dict[str, EditOutcome]:
    """A refusal with ``reason`` for every edit of ``batch`` and every edit merged into one."""
    out: dict[str, EditOutcome] = {}
    for spec in batch:
        for edit_id in (spec.edit_id, *merged.get(spec.edit_id, [])):
            out[edit_id] = EditOutcome(edit_id, False, reason)
    return out


# --- the editor -----------------------------------------------------------------------


class HookEditor:
    """COMEBA-HK on one live model (see the module docstring)."""

    name = "hook"

    @property
    def reads_subjects(self) -> bool:
        """Keys at the subject's last token: the gate opens wherever the subject is named."""
        return self.layout.key_position == "subject_last"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: HookConfig,
        layout: HookLayout,
        covariance: Mapping[int, torch.Tensor],
        calibration_texts: Sequence[str],
        *,
        solve_rounds: int = 4,
        recall_check: bool = True,
    ) -> None:
        """An editor as ``config`` (``[editors.hook]``) describes it, on the hook layers,
        key position and subject floor of ``layout``. ``solve_rounds``: passes of the
        layer loop per batch; ``recall_check``: refuse a batch whose key sites the gate
        does not route to it (both fixed for the daemon, knobs for tests)."""
        n_layers = arch.num_layers(model)
        bad = [i for i in layout.layers if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"hook layers {bad} outside 0..{n_layers - 1}")
        missing = [i for i in layout.layers if i not in covariance]
        if missing:
            raise ValueError(f"no covariance statistics for hook layers {missing}")
        if not calibration_texts:
            raise ValueError("the scope gate needs calibration texts")
        if solve_rounds < 1:
            raise ValueError(f"solve_rounds must be >= 1; got {solve_rounds}")
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.layout = layout
        self._solve_rounds = solve_rounds
        self._recall_check = recall_check
        self._target_settings = TargetSettings.from_config(config)
        self.device = next(model.parameters()).device
        self.hooks: dict[int, HookedProjection] = install_hooks(
            model,
            layout.layers,
            threshold=config.gate_threshold,
            threshold_floor=config.gate_floor,
            cos_floor=config.gate_cos_floor,
            subject_cos_floor=layout.subject_cos_floor,
        )
        self.scope: SubjectScope | None = None
        if config.gate_scope == "subject":
            self.scope = SubjectScope(tokenizer)
            self.scope.attach(model)
            for h in self.hooks.values():
                h.scope = self.scope
                h.snap_keys = config.gate_snap_keys
                h.share_route = config.gate_shared_route
        self._stats_device = (
            self.device if config.stats_device == "model" else torch.device(config.stats_device)
        )
        self._cov = {i: covariance[i].to(self._stats_device, torch.float64) for i in layout.layers}
        self._w0_norm = {
            i: float(torch.linalg.matrix_norm(arch.projection_weight_out_in(h.base).double()))
            for i, h in self.hooks.items()
        }
        self._sums = {i: [zero_sums(h, self._stats_device)] for i, h in self.hooks.items()}
        self._shard_keys = config.shard_keys or max(
            1, min(h.d_in for h in self.hooks.values()) // 2
        )
        self._records: dict[str, Record] = {}  # edit id -> record, in apply order
        self._by_fact: dict[str, str] = {}  # fact key -> live edit id
        self._alias_of: dict[str, str] = {}  # merged duplicate id -> edit id holding it
        self._key_owner: list[str] = []  # edit id of each gate key row (same in every hook)
        self._batches = 0
        self.norm_history: dict[int, list[float]] = {i: [] for i in layout.layers}
        enc = tokenizer(list(calibration_texts), return_tensors="pt", padding=True)
        self._calib_ids = enc["input_ids"].to(self.device)
        self._calib_mask = enc["attention_mask"].to(self.device)
        calibrate_gates(model, self.hooks, self._calib_ids, self._calib_mask)

    # --- queries -----------------------------------------------------------------

    def applied_ids(self) -> list[str]:
        ids: list[str] = []
        for edit_id, record in self._records.items():
            ids.append(edit_id)
            ids.extend(record.aliases)
        return ids

    def routing(self, prompts: Sequence[str]) -> AbstractContextManager[None]:
        # The scope gate decides inside each forward (the subject scope at its prefill).
        return nullcontext()

    def close(self) -> None:
        """Remove the subject scope's model pre-hook (the hooks then gate by key alone)."""
        if self.scope is not None:
            self.scope.close()

    def _sync_scope(self, pending: Sequence[EditSpec] = ()) -> None:
        """Rebuild the subject index from the gate key owners (``pending``: not yet recorded)."""
        if self.scope is None:
            return
        specs = [r.spec for r in self._records.values()] + list(pending)
        self.scope.sync(self._key_owner, {s.edit_id: (s.subject or "", s.prompt) for s in specs})

    def health(self) -> dict[str, Any]:
        """The collapse guard's numbers, for the drift job and metrics."""
        return {
            "edits": len(self._records),
            "batches": self._batches,
            "delta_norm_ratio": {
                i: sum(frobenius(d) ** 2 for d in h.deltas) ** 0.5 / self._w0_norm[i]
                for i, h in self.hooks.items()
            },
            "factored_shards": sum(d.factored for d in self._hook0().deltas),
            "shards": self._hook0().n_shards,
            "last_update_norm": {i: (v[-1] if v else None) for i, v in self.norm_history.items()},
            "gate_keys": int(self._hook0().keys.shape[0]),
            "gate_subject_cos_floor": self.layout.subject_cos_floor,
        }

    def _hook0(self) -> HookedProjection:
        return self.hooks[self.layout.layers[0]]

    # --- apply -------------------------------------------------------------------

    def validate(self, spec: EditSpec) -> str | None:
        """Why the hook back-end cannot take ``spec`` (None when it can)."""
        return refusal_reason(self.tokenizer, spec, self.config.max_target_tokens)

    def apply(self, edits: Sequence[EditSpec]) -> list[EditOutcome]:
        outcomes: dict[str, EditOutcome] = {}
        accepted: list[EditSpec] = []
        for spec in edits:
            reason = self.validate(spec)
            if spec.edit_id in self._records or spec.edit_id in self._alias_of:
                reason = "an edit with this id is already applied"
            if reason is not None:
                outcomes[spec.edit_id] = EditOutcome(spec.edit_id, False, reason)
            else:
                accepted.append(spec)
        batch, merged, conflicts = merge_batch(accepted)
        for edit_id, reason in conflicts.items():
            outcomes[edit_id] = EditOutcome(edit_id, False, reason)
        if batch:
            outcomes.update(self._apply_batch(batch, merged))
        return [outcomes[spec.edit_id] for spec in edits]

    def _snapshot(self) -> dict[str, Any]:
        """What a batch's rollback needs: references, no tensor copy (see the docstring)."""
        return {
            "sums": {i: list(v) for i, v in self._sums.items()},
            "hooks": {i: h.snapshot() for i, h in self.hooks.items()},
            "records": dict(self._records),
            "by_fact": dict(self._by_fact),
            "alias_of": dict(self._alias_of),
            "key_owner": list(self._key_owner),
            "history": {i: list(v) for i, v in self.norm_history.items()},
            "batches": self._batches,
        }

    def _restore(self, snap: Mapping[str, Any]) -> None:
        self._sums = snap["sums"]
        for i, h in self.hooks.items():
            h.restore(snap["hooks"][i])
        self._records = snap["records"]
        self._by_fact = snap["by_fact"]
        self._alias_of = snap["alias_of"]
        self._key_owner = snap["key_owner"]
        self.norm_history = snap["history"]
        self._batches = snap["batches"]
        self._sync_scope()

    def _apply_batch(
        self, batch: list[EditSpec], merged: Mapping[str, list[str]]
    ) -> dict[str, EditOutcome]:
        snap = self._snapshot()
        superseded: dict[str, list[str]] = {}
        try:
            for spec in batch:
                earlier = self._by_fact.get(fact_key(spec))
                if earlier is not None:
                    superseded[spec.edit_id] = [earlier, *self._records[earlier].aliases]
            stale = [ids[0] for ids in superseded.values()]  # the holders; aliases follow
            if stale:
                self._retract_records(stale)
            enc, _ = encode_sites(
                self.tokenizer,
                [s.prompt for s in batch],
                [s.target for s in batch],
                [s.subject for s in batch],
                list(range(len(batch))),
                self.layout.key_position,
                self.device,
            )
            shard = self._shard_for(int(enc.rows.shape[0]))
            texts = [EditText(s.prompt, s.target, s.subject) for s in batch]
            result = self._targets(texts)
            if not all(result.converged) and self._live_keys(shard) > 0:
                # The open shard's delta, applied at the new subjects as the gate would,
                # can garble them (seen on SmolLM2 once a shard held many edits): a
                # fresh shard has none, and leaves the earlier edits' solve alone.
                shard = self._open_shard()
                retry = self._targets(texts)
                log.info(
                    "hook_batch_moved_to_new_shard",
                    shard=shard,
                    converged_before=sum(result.converged),
                    converged=sum(retry.converged),
                )
                result = retry
            keys, outputs = solve_layers(
                self.model,
                self.hooks,
                enc,
                result.values,
                shard,
                self._plan(),
                self._sums,
                self._cov,
                self._w0_norm,
                self.norm_history,
                self._shard_rows,
            )
            site_edit = result.site_edit.tolist()
            for i, h in self.hooks.items():
                h.add_keys(keys[i].T.float(), shard)
            self._key_owner.extend(batch[e].edit_id for e in site_edit)
            self._sync_scope(batch)
            if self._recall_check:
                check_recall(self.model, self.hooks, batch, enc, shard)
        except SolveError as exc:
            self._restore(snap)
            log.warning("hook_batch_refused", reason=str(exc), edits=[s.edit_id for s in batch])
            return refuse_all(batch, merged, f"the solve failed: {exc}")
        self._batches += 1
        for n, spec in enumerate(batch):
            record = Record(
                spec=spec,
                fact=fact_key(spec),
                batch=self._batches,
                shard=shard,
                keys={i: keys[i][[e == n for e in site_edit]] for i in keys},
                outputs={i: outputs[i][[e == n for e in site_edit]] for i in outputs},
                aliases=list(merged.get(spec.edit_id, [])),
            )
            self._records[spec.edit_id] = record
            self._by_fact[record.fact] = spec.edit_id
            for alias in record.aliases:
                self._alias_of[alias] = spec.edit_id
        log.info(
            "hook_batch_applied",
            edits=len(batch),
            shard=shard,
            target_steps=result.steps,
            converged=sum(result.converged),
            superseded=sorted(e for ids in superseded.values() for e in ids),
        )
        outcomes: dict[str, EditOutcome] = {}
        for n, spec in enumerate(batch):
            details = {
                "backend": self.name,
                "target_converged": result.converged[n],
                "target_steps": result.steps,
                "superseded": superseded.get(spec.edit_id, []),
            }
            outcomes[spec.edit_id] = EditOutcome(spec.edit_id, True, None, details)
            for alias in merged.get(spec.edit_id, []):
                outcomes[alias] = EditOutcome(
                    alias, True, None, {**details, "merged_into": spec.edit_id}
                )
        return outcomes

    def _plan(self) -> SolvePlan:
        return SolvePlan(
            self.layout.layers,
            self.config.covariance_weight,
            self._solve_rounds,
            self.config.max_update_norm_zscore,
        )

    def _targets(self, texts: Sequence[EditText]) -> TargetResult:
        """v* for a batch, optimised with the open shard applied at its key sites."""
        return optimise_targets(
            self.model,
            self.tokenizer,
            self.hooks,
            texts,
            self.layout.layers[-1],
            self.layout.key_position,
            self._target_settings,
        )

    def _live_keys(self, shard: int) -> int:
        return int((self._hook0().key_shard == shard).sum())

    def _shard_for(self, n_sites: int) -> int:
        """The shard a batch of ``n_sites`` key sites goes to (opening one when full)."""
        last = self._hook0().n_shards - 1
        live = self._live_keys(last)
        if live == 0 or live + n_sites <= self._shard_keys:
            return last
        return self._open_shard()

    def _open_shard(self) -> int:
        """Open a new (empty) shard on every hook layer; its index."""
        last = self._hook0().n_shards - 1
        for layer, h in self.hooks.items():
            h.add_shard()
            self._sums[layer].append(zero_sums(h, self._stats_device))
        log.info("hook_shard_opened", shard=last + 1, keys_in_previous=self._live_keys(last))
        return last + 1

    @torch.no_grad()
    # --- retraction --------------------------------------------------------------

    def retract(self, edit_ids: Sequence[str]) -> None:
        unknown = [e for e in edit_ids if e not in self._records and e not in self._alias_of]
        if unknown:
            raise EditorStateError(
                f"hook editor: cannot retract edits that are not applied: {unknown}",
                edit_ids=unknown,
            )
        # A merged duplicate shares its fact's key: retracting either retracts the fact.
        holders = list(dict.fromkeys(self._alias_of.get(e, e) for e in edit_ids))
        self._retract_records(holders)

    def _retract_records(self, holder_ids: Sequence[str]) -> None:
        gone = set(holder_ids)
        rows = [n for n, edit_id in enumerate(self._key_owner) if edit_id in gone]
        shards = sorted({self._records[e].shard for e in holder_ids})
        for layer, hook in self.hooks.items():
            for edit_id in holder_ids:
                record = self._records[edit_id]
                k, t = record.keys[layer], record.outputs[layer]  # (sites, d_in/d_out)
                self._sums[layer][record.shard] = self._sums[layer][record.shard].minus(k, t)
            hook.remove_keys(rows)
        self._key_owner = [e for e in self._key_owner if e not in gone]
        for edit_id in holder_ids:
            record = self._records.pop(edit_id)
            self._by_fact.pop(record.fact, None)
            for alias in record.aliases:
                self._alias_of.pop(alias, None)
        self._sync_scope()
        self._resolve(shards)
        log.info("hook_edits_retracted", edits=sorted(gone), remaining=len(self._records))

    def _resolve(self, shards: Sequence[int]) -> None:
        """Solve ``shards`` again from their sums (an emptied shard is zeroed exactly)."""
        live = {r.shard for r in self._records.values()}
        resolve_shards(
            self.hooks,
            self._sums,
            self._cov,
            self.config.covariance_weight,
            shards,
            live,
            self._shard_rows,
        )

    def _shard_rows(self, layer: int, shard: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys ``(n, d_in)`` and outputs ``(n, d_out)`` of ``shard``'s live edits."""
        widths = (self.hooks[layer].d_in, self.hooks[layer].d_out)
        return shard_rows(self._records.values(), layer, shard, widths, self._stats_device)

    # --- state -------------------------------------------------------------------

    def _manifest(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "editor": self.name,
            # "settings" and its "cov_weight" name are the state format (version 4)
            "settings": {
                "layers": list(self.layout.layers),
                "key_position": self.layout.key_position,
                "cov_weight": self.config.covariance_weight,
            },
            "covariance_sha": {str(i): tensor_sha(c) for i, c in self._cov.items()},
            "batches": self._batches,
            "norm_history": {str(i): v for i, v in self.norm_history.items()},
            "records": records_manifest(self._records),
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        return pack_tensors(
            {i: hook_buffers(h) for i, h in self.hooks.items()},
            self._records,
            {i: (h.d_in, h.d_out) for i, h in self.hooks.items()},
        )

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "manifest": self._manifest(), "tensors": self._tensors()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") not in READABLE_VERSIONS:
            raise EditorStateError(
                f"hook editor state has version {state.get('version')!r}; "
                f"this code reads {READABLE_VERSIONS}"
            )
        self._load(dict(state["manifest"]), dict(state["tensors"]))

    def _load(self, manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        expected = {str(i): tensor_sha(c) for i, c in self._cov.items()}
        check_compatible(manifest, self.layout.layers, self.layout.key_position, expected)
        try:
            stats = self._stats_device
            records = unpack_records(manifest["records"], tensors, list(self.hooks), stats)
            for layer, hook in self.hooks.items():
                hook.load_state_dict(hook_state(tensors, layer), strict=False)
            widths = {i: (h.d_in, h.d_out) for i, h in self.hooks.items()}
            n_shards = self._hook0().n_shards
            sums = load_sums(
                manifest["version"], tensors, records.values(), widths, n_shards, stats
            )
            for layer, hook in self.hooks.items():
                if hook.n_shards != len(sums[layer]):
                    raise ValueError(f"layer {layer}: shard counts of sums and deltas differ")
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise EditorStateError(f"hook editor state is malformed: {exc}") from exc
        self.layout = replace(self.layout, subject_cos_floor=self._hook0().subject_floor)
        self._sums = sums
        self._records = records
        self._by_fact = {r.fact: e for e, r in records.items()}
        self._alias_of = {a: e for e, r in records.items() for a in r.aliases}
        self._key_owner = [e for e, r in records.items() for _ in range(r.sites)]
        self._sync_scope()
        self._batches = int(manifest.get("batches", 0))
        history = manifest.get("norm_history", {})
        self.norm_history = {i: [float(x) for x in history.get(str(i), [])] for i in self.hooks}
        log.info("hook_state_loaded", edits=len(records))

    def save(self, directory: Path | str) -> None:
        """Write the state as ``tensors.safetensors`` plus ``manifest.json`` (atomically)."""
        write_state(Path(directory), self._manifest(), self._tensors())

    def load(self, directory: Path | str) -> None:
        """Read what ``save`` wrote; raise EditorStateError when it does not fit."""
        self._load(*read_state(Path(directory)))
