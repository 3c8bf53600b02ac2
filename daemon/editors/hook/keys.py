"""Where a hook edit reads its key, and one forward pass that captures keys and residuals.

A *key position* is the token whose MLP activation stands for the fact:

- ``subject_last``: the subject's last token (found from character offsets, so
  BOS, leading-space BPE and either padding side are handled), where large models
  such as GPT-2 XL and GPT-J recall facts in their middle layers;
- ``prompt_last``: the prompt's last real token, where small models whose
  attention carries the subject forward early recall them (``editd locate``
  decides between the two with activation patching).

A key at layer ``l`` is the *input* of that layer's MLP output projection at the
key position; the residual at layer ``l`` is the decoder block's output there.
:func:`capture` reads both in one no-grad forward pass while the hooks apply
their deltas exactly at the batch's key positions (``gate_positions``), which is
what the scope gate does for those prompts at inference.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from daemon.editors.hook.layer import HookedProjection, gate_positions
from daemon.model import arch
from daemon.model.batches import encode_prompt_target, padded_forward_inputs, target_token_ids
from daemon.model.partial import forward_until
from daemon.model.tokens import subject_last_token_index

KeyKind = Literal["subject_last", "prompt_last"]
KEY_KINDS: tuple[KeyKind, ...] = ("subject_last", "prompt_last")


@dataclass(frozen=True)
class KeySites:
    """A left-padded batch and the key sites in it: site ``s`` is (``rows[s]``, ``positions[s]``).

    ``owner[s]`` is the index of the edit the site belongs to. An edit has one site
    with ``subject_last`` keys and one per target token with ``prompt_last`` keys.
    """

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    rows: torch.Tensor  # (S,) long
    positions: torch.Tensor  # (S,) long
    owner: torch.Tensor  # (S,) long

    def position_mask(self) -> torch.Tensor:
        """(B, T) bool: True exactly at the key sites."""
        mask = torch.zeros_like(self.attention_mask, dtype=torch.bool)
        mask[self.rows, self.positions] = True
        return mask

    def forward_inputs(self) -> dict[str, torch.Tensor]:
        """The batch as forward keyword arguments, position ids included.

        Every row keeps the positions it has alone (GPT-2's absolute positions
        would otherwise shift by the row's left padding).
        """
        return padded_forward_inputs(self.input_ids, self.attention_mask)


def site_offsets(kind: KeyKind, subject_index: int, prompt_len: int, n_target: int) -> list[int]:
    """Key sites of one edit as token indices into ``prompt + target`` (no padding).

    ``prompt_last`` keys sit at every position whose next-token logits predict a
    target token (the prompt's last token, then each target token but the last):
    a residual change at the prompt's last token cannot steer later tokens through
    the final block, so a multi-token target needs a key per token. ``subject_last``
    keys sit at the subject's last token only, as in MEMIT.
    """
    if kind == "prompt_last":
        return [prompt_len - 1 + j for j in range(n_target)]
    return [subject_index]


def encode_sites(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    subjects: Sequence[str | None],
    owners: Sequence[int],
    kind: KeyKind,
    device: torch.device,
) -> tuple[KeySites, torch.Tensor]:
    """Encode ``prompt + target`` rows (left padded) and their key sites.

    Returns the sites and the shifted target labels ``(B, T)`` (-100 elsewhere) of
    ``daemon.model.batches.encode_prompt_target``.
    """
    batch = encode_prompt_target(tokenizer, prompts, targets)
    rows: list[int] = []
    positions: list[int] = []
    site_owner: list[int] = []
    for r, (prompt, target, subject) in enumerate(zip(prompts, targets, subjects, strict=True)):
        prompt_len = len(tokenizer(prompt)["input_ids"])
        n_target = len(target_token_ids(tokenizer, prompt, target))
        subject_index = (
            subject_last_token_index(tokenizer, prompt, subject or "")
            if kind == "subject_last"
            else -1
        )
        start = int(batch.prompt_last[r]) - prompt_len + 1  # the row's left padding
        for offset in site_offsets(kind, subject_index, prompt_len, n_target):
            rows.append(r)
            positions.append(start + offset)
            site_owner.append(owners[r])
    sites = KeySites(
        batch.input_ids.to(device),
        batch.attention_mask.to(device),
        torch.tensor(rows, dtype=torch.long, device=device),
        torch.tensor(positions, dtype=torch.long, device=device),
        torch.tensor(site_owner, dtype=torch.long, device=device),
    )
    return sites, batch.labels.to(device)


@dataclass(frozen=True)
class Captured:
    """Keys per hook layer ``{layer: (S, d_in)}`` and residuals ``(S, d_model)``, float32."""

    keys: dict[int, torch.Tensor]
    residual: torch.Tensor


@contextmanager
def _recording(
    model: nn.Module,
    key_layers: Sequence[int],
    residual_layer: int,
    rows: torch.Tensor,
    positions: torch.Tensor,
) -> Iterator[dict[str, Any]]:
    out: dict[str, Any] = {"keys": {}}
    handles = []

    def key_hook(layer: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            out["keys"][layer] = args[0][rows, positions].detach().float()

        return hook

    def residual_hook(_module: nn.Module, _args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        out["residual"] = hidden[rows, positions].detach().float()

    try:
        for layer in key_layers:
            module = arch.mlp_out_module(model, layer)
            handles.append(module.register_forward_pre_hook(key_hook(layer)))
        block = arch.layer_block(model, residual_layer)
        handles.append(block.register_forward_hook(residual_hook))
        yield out
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def capture(
    model: nn.Module,
    hooks: Mapping[int, HookedProjection],
    batch: KeySites,
    key_layers: Sequence[int],
    residual_layer: int,
    *,
    apply_deltas: bool = True,
) -> Captured:
    """Keys at ``key_layers`` and the residual after block ``residual_layer``, at the sites.

    With ``apply_deltas`` the hooks add their deltas at the key positions only;
    without, the forward pass is the base model's.
    """
    mask = batch.position_mask() if apply_deltas else None
    with (
        gate_positions(hooks, mask),
        _recording(model, key_layers, residual_layer, batch.rows, batch.positions) as out,
    ):
        top = max([*key_layers, residual_layer])
        last = arch.layer_block(model, top)  # keys and residual are read by then
        forward_until(model, last, **batch.forward_inputs(), use_cache=False)
    return Captured(keys=dict(out["keys"]), residual=out["residual"])
