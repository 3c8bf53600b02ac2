"""Target values v*: what the residual stream at the key position must become.

For a batch of edits, one residual-stream delta ``delta_i`` per edit is added to the
output of block ``layer`` (the last hook layer) at the edit's key position, and all
deltas are optimised *jointly* with Adam in one batched forward/backward pass per
step (the cost of a batch is that of its longest row, not of its size):

    loss = mean_rows NLL(target | prompt, delta)
         + kl_weight * KL(p_base || p_delta) on "{subject} is a"   (subject_last keys)
         + decay * ||delta_i||^2 / ||h_i||^2

Each edit is seen as its plain prompt and under a few context prefixes (MEMIT's
averaging over contexts), so the value does not depend on what precedes the
prompt. After every step each delta is clamped to ``norm_clamp * ||h_i||`` (``h_i``
the unedited residual there), and the loop stops as soon as every row's target is
the argmax at every target position, which for a greedy decoder means the target
is generated. The result is ``v*_i = h_i + delta_i`` on the plain prompt.

The essence (KL) term keeps what the model says about the subject in general;
with ``prompt_last`` keys there is no subject position to hold it at, so only the
norm decay and the clamp bound the change (the scope gate protects locality).

Each step runs only the blocks above ``layer`` (``daemon.model.partial.replaying``:
block ``layer``'s output is recorded once per batch) and computes logits only at
the target positions (``logits_to_keep``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from daemon.editors.hook.config import HookConfig
from daemon.editors.hook.keys import KeyKind, encode_sites
from daemon.editors.hook.layer import HookedProjection, gate_positions
from daemon.model import arch
from daemon.model.batches import (
    label_window,
    left_pad,
    padded_forward_inputs,
    padding_id,
    target_nll,
    target_token_hits,
)
from daemon.model.partial import record_block_output, replaying
from daemon.model.tokens import subject_last_token_index

ESSENCE_TEMPLATE = "{subject} is a"


@dataclass(frozen=True)
class TargetSettings:
    """How v* is optimised (see the module docstring): ``[editors.hook]``'s ``target_*``
    keys (:meth:`from_config`, validated there) and two constants of the method."""

    steps: int = 25
    learning_rate: float = 0.5
    kl_weight: float = 0.0625
    norm_clamp: float = 4.0
    decay: float = 1e-3
    prefixes: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: HookConfig) -> TargetSettings:
        return cls(
            steps=cfg.target_steps,
            learning_rate=cfg.target_learning_rate,
            kl_weight=cfg.target_kl_weight,
            norm_clamp=cfg.target_norm_clamp,
        )


@dataclass(frozen=True)
class EditText:
    """What target optimisation needs of one edit."""

    prompt: str
    target: str
    subject: str | None


@dataclass(frozen=True)
class TargetResult:
    """v* per key site (``values`` ``(S, d_model)``, ``site_edit`` its edit); per-edit convergence.

    Sites are in the order ``keys.encode_sites`` gives for the plain prompts.
    """

    values: torch.Tensor
    initial: torch.Tensor
    site_edit: torch.Tensor
    converged: tuple[bool, ...]
    steps: int
    final_loss: float


@contextmanager
def _residual_delta(
    model: nn.Module,
    layer: int,
    rows: torch.Tensor,
    positions: torch.Tensor,
    owner: torch.Tensor,
    delta: torch.Tensor,
) -> Iterator[None]:
    """Add ``delta[owner[s]]`` to block ``layer``'s output at (rows[s], positions[s])."""

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        add = torch.zeros_like(hidden)
        add = add.index_put((rows, positions), delta[owner].to(hidden.dtype))
        edited = hidden + add
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    handle = arch.layer_block(model, layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def optimise_targets(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    hooks: Mapping[int, HookedProjection],
    edits: Sequence[EditText],
    layer: int,
    kind: KeyKind,
    settings: TargetSettings,
) -> TargetResult:
    """Jointly optimise one residual delta per key site at block ``layer`` (see module doc).

    Sites are those of ``keys.encode_sites`` on the plain prompts; each prefixed
    variant of an edit shares its deltas. The hooks apply their current deltas at
    the sites only, as the scope gate does for an edit's own prompt at inference.
    """
    if not edits:
        raise ValueError("optimise_targets needs at least one edit")
    device = next(model.parameters()).device
    variants = ("", *settings.prefixes)
    prompts = [f"{p} {e.prompt}" if p else e.prompt for e in edits for p in variants]
    owners = [i for i in range(len(edits)) for _ in variants]
    sites, labels = encode_sites(
        tokenizer,
        prompts,
        [e.target for e in edits for _ in variants],
        [e.subject for e in edits for _ in variants],
        owners,
        kind,
        device,
    )
    # site ids: the k-th site of an edit is shared by all its variants
    site_id: list[int] = []
    first_site: dict[tuple[int, int], int] = {}
    seen: dict[int, int] = {}
    for row, edit in zip(sites.rows.tolist(), sites.owner.tolist(), strict=True):
        k = seen.get(row, 0)
        seen[row] = k + 1
        site_id.append(first_site.setdefault((edit, k), len(first_site)))
    site_of = torch.tensor(site_id, device=device)
    # rows run edit-major, variants inner: the plain prompt's sites, in site-id order
    plain = [s for s, row in enumerate(sites.rows.tolist()) if row % len(variants) == 0]
    site_edit = torch.tensor([owners[int(sites.rows[s])] for s in plain], device=device)
    inputs = sites.forward_inputs()
    key_mask = sites.position_mask()
    keep = label_window(labels)  # logits only where targets are scored
    labels = labels[:, -keep:]

    def forward() -> torch.Tensor:
        logits: torch.Tensor = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        return logits

    essence = _essence_batch(tokenizer, edits, kind, device)
    # nothing below block ``layer`` changes while delta is optimised: record that block's
    # output once per batch and replay it (the hooks' deltas at the sites included)
    with gate_positions(hooks, key_mask):
        recorded = record_block_output(model, layer, **inputs)
    hidden = recorded[0] if isinstance(recorded, tuple) else recorded
    initial = hidden[sites.rows, sites.positions].float()[plain]  # (n_sites, d), site-id order
    base_essence = essence_recorded = None
    if essence is not None:  # its own batch: not under the sites' position mask
        essence_recorded = record_block_output(model, layer, **_essence_inputs(essence))
        with torch.no_grad(), replaying(model, layer, essence_recorded):
            base_essence = torch.log_softmax(_essence_logits(model, essence), dim=-1)

    delta = torch.zeros_like(initial, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=settings.learning_rate)
    limit = settings.norm_clamp * initial.norm(dim=-1, keepdim=True)  # (n_sites, 1)
    init_sq = initial.pow(2).sum(dim=-1).clamp(min=1e-12)  # (n_sites,)
    row_owner = torch.tensor(owners, device=device)
    converged = torch.zeros(len(edits), dtype=torch.bool)
    steps = 0
    loss_value = float("nan")
    for steps in range(1, settings.steps + 1):
        optimiser.zero_grad(set_to_none=True)
        with (
            replaying(model, layer, recorded),
            _residual_delta(model, layer, sites.rows, sites.positions, site_of, delta),
        ):
            logits = forward()
        nll = target_nll(logits, labels)  # (rows,)
        hits = target_token_hits(logits.detach(), labels) >= 1.0  # (rows,)
        converged = (
            torch.ones(len(edits), device=device)
            .scatter_reduce(0, row_owner, hits.float(), reduce="amin")
            .bool()
            .cpu()
        )
        if bool(converged.all()):
            loss_value = float(nll.detach().mean())
            steps -= 1
            break
        loss = nll.mean() + settings.decay * (delta.pow(2).sum(dim=-1) / init_sq).mean()
        if essence is not None and base_essence is not None and settings.kl_weight > 0:
            with (
                replaying(model, layer, essence_recorded),
                _residual_delta(
                    model, layer, essence["rows"], essence["positions"], essence["owner"], delta
                ),
            ):
                logp = torch.log_softmax(_essence_logits(model, essence), dim=-1)
            kl = torch.nn.functional.kl_div(
                logp, base_essence, log_target=True, reduction="batchmean"
            )
            loss = loss + settings.kl_weight * kl
        loss.backward()
        optimiser.step()
        loss_value = float(loss.detach())
        with torch.no_grad():
            norms = delta.norm(dim=-1, keepdim=True)
            delta.mul_(torch.where(norms > limit, limit / norms.clamp(min=1e-12), 1.0))
    return TargetResult(
        values=(initial + delta.detach()).float(),
        initial=initial,
        site_edit=site_edit,
        converged=tuple(bool(c) for c in converged.tolist()),
        steps=steps,
        final_loss=loss_value,
    )


def _essence_batch(
    tokenizer: PreTrainedTokenizerBase,
    edits: Sequence[EditText],
    kind: KeyKind,
    device: torch.device,
) -> dict[str, torch.Tensor] | None:
    """The "{subject} is a" prompts of the edits (subject_last keys only).

    With subject-last keys an edit has exactly one site, so site id = edit index.
    """
    if kind != "subject_last":
        return None
    prompts = [ESSENCE_TEMPLATE.format(subject=e.subject) for e in edits]
    ids, mask = left_pad([tokenizer(p)["input_ids"] for p in prompts], padding_id(tokenizer))
    idx = [
        subject_last_token_index(tokenizer, p, e.subject or "")
        for p, e in zip(prompts, edits, strict=True)
    ]
    lengths = mask.sum(dim=1)
    width = mask.shape[1]
    positions = torch.tensor(idx) + (width - lengths)  # left padding
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "rows": torch.arange(len(prompts), device=device),
        "positions": positions.to(device),
        "owner": torch.arange(len(prompts), device=device),
    }


def _essence_inputs(essence: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return padded_forward_inputs(essence["input_ids"], essence["attention_mask"])


def _essence_logits(model: nn.Module, essence: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Next-token logits at the last token of each essence prompt: (n, V)."""
    inputs = _essence_inputs(essence)
    logits: torch.Tensor = model(**inputs, use_cache=False, logits_to_keep=1).logits
    return logits[:, -1].float()
