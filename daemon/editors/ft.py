"""The ``ft`` editor: plain fine-tuning of one MLP output projection (the field's FT-L).

Each batch of edits is trained into the weight of one layer's MLP output
projection with Adam on the target's negative log-likelihood, stopping early
once every target is the teacher-forced argmax. An optional L-infinity bound
keeps the weight within ``norm_constraint`` of the base weight (FT-L's
constraint; 0 disables it). Nothing routes or gates: every input sees the
changed weight, which is why sequential fine-tuning is known to drift and
forget. It is here as an honest baseline, not as a back-end.

Retraction is exact with respect to a replay: the base weight is restored and
the remaining batches are re-trained in their original order with the same
seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import structlog
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from daemon.editors.base import EditOutcome, EditSpec
from daemon.errors import EditorStateError
from daemon.model import arch
from daemon.model.batches import (
    encode_prompt_target,
    label_window,
    padded_forward_inputs,
    target_nll,
    target_token_hits,
)

log = structlog.get_logger()

STATE_VERSION = 1


@dataclass(frozen=True)
class FtConfig:
    """FT-L settings. ``layer = -1`` picks the middle layer."""

    layer: int = -1
    max_steps: int = 25
    learning_rate: float = 5e-4
    norm_constraint: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.learning_rate <= 0 or self.norm_constraint < 0:
            raise ValueError("max_steps >= 1, learning_rate > 0, norm_constraint >= 0 required")


def _spec_to_dict(spec: EditSpec) -> dict[str, Any]:
    out = asdict(spec)
    out["rephrases"] = list(spec.rephrases)
    return out


def _spec_from_dict(data: Mapping[str, Any]) -> EditSpec:
    return EditSpec(
        edit_id=str(data["edit_id"]),
        prompt=str(data["prompt"]),
        target=str(data["target"]),
        subject=data.get("subject"),
        relation=data.get("relation"),
        rephrases=tuple(data.get("rephrases", ())),
    )


class FtEditor:
    """Fine-tunes one projection weight per batch; keeps the batches for replay."""

    name = "ft"
    reads_subjects = True  # one weight update for every input: subject-naming ones too

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: FtConfig
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        n_layers = arch.num_layers(model)
        self.layer = config.layer if config.layer >= 0 else n_layers // 2
        if self.layer >= n_layers:
            raise ValueError(f"layer {self.layer} out of range for a {n_layers}-layer model")
        module = arch.unwrap_projection(arch.mlp_out_module(model, self.layer))
        weight = module.weight
        if not isinstance(weight, torch.nn.Parameter):
            raise TypeError(f"layer {self.layer}'s projection has no weight parameter")
        self.weight = weight
        self.base_weight = self.weight.detach().clone()
        self._batches: list[list[EditSpec]] = []

    # --- editing ---------------------------------------------------------------------

    def apply(self, edits: Sequence[EditSpec]) -> list[EditOutcome]:
        if not edits:
            return []
        steps = self._train(list(edits), seed=self.config.seed + len(self._batches))
        self._batches.append(list(edits))
        log.info("ft_batch_trained", edits=len(edits), steps=steps, layer=self.layer)
        return [EditOutcome(e.edit_id, accepted=True, details={"steps": steps}) for e in edits]

    def _train(self, edits: list[EditSpec], seed: int) -> int:
        prompts = [e.prompt for e in edits] + [r for e in edits for r in e.rephrases]
        targets = [e.target for e in edits] + [e.target for e in edits for _ in e.rephrases]
        device = self.weight.device
        batch = encode_prompt_target(self.tokenizer, prompts, targets).to(device)
        inputs = padded_forward_inputs(batch.input_ids, batch.attention_mask)  # left padded
        keep = label_window(batch.labels)  # the LM head only where targets are scored
        labels = batch.labels[:, -keep:]
        torch.manual_seed(seed)
        self.weight.requires_grad_(True)
        optimizer = torch.optim.Adam([self.weight], lr=self.config.learning_rate)
        steps = 0
        try:
            for steps in range(1, self.config.max_steps + 1):
                logits = self.model(**inputs, use_cache=False, logits_to_keep=keep).logits
                if bool((target_token_hits(logits, labels) == 1.0).all()):
                    steps -= 1
                    break
                loss = target_nll(logits, labels).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]  # torch stub
                optimizer.step()
                self._clamp()
        finally:
            self.weight.requires_grad_(False)
            self.weight.grad = None
        return steps

    @torch.no_grad()
    def _clamp(self) -> None:
        eps = self.config.norm_constraint
        if eps > 0:
            low, high = self.base_weight - eps, self.base_weight + eps
            self.weight.copy_(torch.maximum(torch.minimum(self.weight, high), low))

    def retract(self, edit_ids: Sequence[str]) -> None:
        gone = set(edit_ids)
        remaining = [[e for e in b if e.edit_id not in gone] for b in self._batches]
        with torch.no_grad():
            self.weight.copy_(self.base_weight)
        self._batches = []
        for batch in remaining:
            if batch:
                self.apply(batch)

    def applied_ids(self) -> list[str]:
        return [e.edit_id for b in self._batches for e in b]

    def routing(self, prompts: Sequence[str]) -> AbstractContextManager[None]:
        return nullcontext()

    # --- state -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "editor": self.name,
            "layer": self.layer,
            "weight": self.weight.detach().cpu().clone(),
            "batches": [[_spec_to_dict(e) for e in b] for b in self._batches],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or state.get("editor") != self.name:
            raise EditorStateError(
                f"expected an ft editor state of version {STATE_VERSION}, "
                f"got editor={state.get('editor')!r} version={state.get('version')!r}"
            )
        if state["layer"] != self.layer or state["weight"].shape != self.weight.shape:
            raise EditorStateError("ft state was saved for another layer or model shape")
        with torch.no_grad():
            self.weight.copy_(state["weight"].to(self.weight.device, self.weight.dtype))
        self._batches = [[_spec_from_dict(e) for e in b] for b in state["batches"]]
