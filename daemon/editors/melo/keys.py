"""MELO's routing keys: one function, used identically when editing and when serving.

A prompt's key is the residual stream leaving block ``key_layer`` at the prompt's
LAST REAL token (never from prompt + target, never at a pad), divided by its L2
norm. With ``key_position = "subject_last"`` an edit's key is read at the last
token of its subject instead (``KeyReader(prompts, subjects)``), and a request is
looked up by the keys of ALL its prompt tokens (``token_keys``, ``span_keys``):
the nearest stored key within reach, at a token where that edit's subject (its
token n-grams) ends, routes it, wherever the subject sits in the request.

:class:`KeyReader` computes the keys that go into the neuron index at edit time; a
request's keys are read by :func:`unit_keys` from the same layer of its own prefill
(``routing.InlineRouter``), or by :class:`KeyReader` when the request's batch does not
allow it, so the two can only differ by float rounding between batch shapes.

:class:`KeyTable` holds the applied edits' prompt keys (edit id -> key) as one
matrix, for finding the applied edits a batch of new keys may re-route.

Why these choices:

* **Below the LoRA layers, base model only.** ``key_layer`` must lie below the
  lowest LoRA layer, so a key cannot depend on the blocks it selects, and the
  forward runs inside ``route_rows([None] * B)`` so even an outer routing
  context cannot leak into it. The forward is cut short at the key layer (a
  hook raises once the block's output is captured): keys cost only the layers
  up to ``key_layer``.
* **Positions from the mask.** Prompts are padded (left or right, whatever the
  tokenizer does); ``position_ids`` are the running count of real tokens
  (``batches.left_padded_position_ids``, as ``generate`` and teacher-forced scoring
  compute them for real tokens), so a padded prompt gets the key it would get
  alone, also with absolute position embeddings (GPT-2).
* **Unit norm.** At a radius that leaves locality probes unrouted, unit-norm keys
  route more rephrases to their edit than raw keys: the norm of the hidden state
  mostly carries the template, its direction the fact.

The capture hook is installed once and stays: whether a forward is being
captured is a context variable, so concurrent requests in other threads run
their full forward untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from daemon.editors.melo.routing import route_rows
from daemon.model import arch
from daemon.model.batches import left_padded_position_ids
from daemon.model.tokens import batch_subject_last_token_indices, last_prompt_token_indices

F32 = npt.NDArray[np.float32]


class _KeyCaptured(Exception):
    """Raised by the capture hook to stop the forward once the key layer has run."""


_CAPTURE: ContextVar[list[torch.Tensor] | None] = ContextVar("melo_key_capture", default=None)


def _capture_hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
    slot = _CAPTURE.get()
    if slot is None:
        return
    hidden = output[0] if isinstance(output, tuple) else output
    slot.append(hidden.detach())
    raise _KeyCaptured


class KeyReader:
    """Computes unit-norm float32 keys of prompts at the output of block ``layer``."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        layer: int,
        *,
        batch_size: int = 64,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.layer = layer
        self.batch_size = batch_size
        self.dim = arch.hidden_size(model)
        self._handle = arch.layer_block(model, layer).register_forward_hook(_capture_hook)

    def close(self) -> None:
        """Remove the capture hook (the editor calls this when it is discarded)."""
        self._handle.remove()

    def __call__(self, prompts: Sequence[str], subjects: Sequence[str | None] | None = None) -> F32:
        """Keys ``(len(prompts), d)``, float32, unit L2 norm, in the prompts' order.

        With ``subjects``, prompt ``i``'s key is read at the last token of
        ``subjects[i]``'s first occurrence in it (``key_position = "subject_last"``);
        a None subject, or one the prompt does not contain, gives its last token.
        """
        if not prompts:
            return np.zeros((0, self.dim), dtype=np.float32)
        named: list[str | None] = list(subjects) if subjects is not None else [None] * len(prompts)
        if len(named) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(named)} subjects")
        parts = [
            self._batch_keys(
                list(prompts[start : start + self.batch_size]),
                named[start : start + self.batch_size],
            )
            for start in range(0, len(prompts), self.batch_size)
        ]
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)

    def token_keys(self, prompts: Sequence[str]) -> list[F32]:
        """Per prompt, the unit keys of all its tokens ``(T_i, d)``, in token order."""
        out: list[F32] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[start : start + self.batch_size])
            enc = self.tokenizer(chunk, padding=True, return_tensors="pt")
            device = next(self.model.parameters()).device
            mask = enc["attention_mask"].to(device)  # [B, T]
            with torch.no_grad():
                hidden = self._hidden(enc["input_ids"].to(device), mask)  # [B, T, d]
            for row in range(hidden.shape[0]):
                real = mask[row].nonzero().flatten()
                out.append(span_keys(hidden[row], int(real[0]), int(real[-1])))
        return out

    @torch.no_grad()
    def _batch_keys(self, prompts: list[str], subjects: list[str | None]) -> F32:
        enc = self.tokenizer(prompts, padding=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        mask = enc["attention_mask"].to(device)  # [B, T]
        hidden = self._hidden(enc["input_ids"].to(device), mask)  # [B, T, d]
        positions = last_prompt_token_indices(mask)
        for row, (prompt, subject) in enumerate(zip(prompts, subjects, strict=True)):
            if subject is not None and subject.strip() and subject.strip() in prompt:
                positions[row] = batch_subject_last_token_indices(
                    self.tokenizer, [prompt], [subject], mask[row : row + 1]
                )[0]
        return unit_keys(hidden, positions)

    def _hidden(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows = [None] * input_ids.shape[0]
        with _capturing() as slot, route_rows(rows), suppress(_KeyCaptured):
            self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=left_padded_position_ids(mask),
                use_cache=False,
            )
        if not slot:
            raise RuntimeError(f"the key layer {self.layer} did not run in the forward pass")
        return slot[0]


@torch.no_grad()
def unit_keys(hidden: torch.Tensor, last: torch.Tensor) -> F32:
    """Unit-norm float32 keys ``(B, d)``: ``hidden`` ``[B, T, d]`` at row ``i``'s ``last[i]``."""
    rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()  # [B, d]
    rows = rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    out: F32 = rows.cpu().numpy().astype(np.float32)
    return out


@torch.no_grad()
def span_keys(hidden: torch.Tensor, start: int, end: int) -> F32:
    """Unit-norm float32 keys ``(end - start + 1, d)`` of ``hidden`` ``[T, d]``'s rows
    ``start..end`` (inclusive)."""
    rows = hidden[start : end + 1].float()
    rows = rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    out: F32 = rows.cpu().numpy().astype(np.float32)
    return out


@contextmanager
def _capturing() -> Iterator[list[torch.Tensor]]:
    slot: list[torch.Tensor] = []
    token = _CAPTURE.set(slot)
    try:
        yield slot
    finally:
        _CAPTURE.reset(token)


class KeyTable(Mapping[str, F32]):
    """Edit id -> float32 key ``(d,)``, stored as rows of one ``(N, d)`` matrix.

    The applied edits' prompt keys, which ``verify.watch_routes`` compares with each
    batch's new keys: they already lie in one ``(N, d)`` buffer (no stacking per
    batch) that doubles when full, and a removal moves the last row into the hole, so
    adding and removing are O(d) and the matrix is a view. Row order is not edit
    order: callers that need an order (the editor's state) look keys up by id.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._buf: F32 = np.zeros((64, dim), dtype=np.float32)
        self._ids: list[str] = []  # row -> edit id
        self._rows: dict[str, int] = {}  # edit id -> row

    def __getitem__(self, edit_id: str) -> F32:
        key: F32 = self._buf[self._rows[edit_id]].copy()
        return key

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._ids))

    def __len__(self) -> int:
        return len(self._ids)

    def __setitem__(self, edit_id: str, key: F32) -> None:
        row = self._rows.get(edit_id)
        if row is None:
            row = len(self._ids)
            if row == len(self._buf):  # double: amortised O(d) per key
                grown = np.zeros((2 * len(self._buf), self.dim), dtype=np.float32)
                grown[:row] = self._buf[:row]
                self._buf = grown
            self._ids.append(edit_id)
            self._rows[edit_id] = row
        self._buf[row] = np.asarray(key, dtype=np.float32).reshape(self.dim)

    def __delitem__(self, edit_id: str) -> None:
        row = self._rows.pop(edit_id)
        last = len(self._ids) - 1
        moved = self._ids.pop()
        if row != last:  # the last row fills the hole
            self._buf[row] = self._buf[last]
            self._ids[row] = moved
            self._rows[moved] = row

    def ids(self) -> list[str]:
        """The edit id of each row of ``matrix()``."""
        return list(self._ids)

    def matrix(self) -> F32:
        """``(N, d)`` float32, row i the key of ``ids()[i]`` (a view: do not keep it)."""
        return self._buf[: len(self._ids)]
