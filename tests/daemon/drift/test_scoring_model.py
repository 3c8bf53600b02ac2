"""Drift scores of the micro fact-world model against its own base scores."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel

from daemon.drift.probes import (
    BaseScores,
    Probe,
    StaleBaseScoresError,
    last_token_logprobs,
    null_routing,
    score_base,
)
from daemon.drift.scoring import DriftThresholds, judge, score_edited, top1_agreement
from daemon.model import arch


def test_base_against_itself_agrees_fully(
    micro_model: PreTrainedModel,
    micro_tokenizer: Any,
    world_probes: list[Probe],
    base_scores: BaseScores,
) -> None:
    """The unedited model has agreement 1.0 and KL 0 against its own base scores."""
    scores = score_edited(
        micro_model, micro_tokenizer, world_probes, base_scores, null_routing, batch_size=16
    )
    assert scores.n == len(world_probes)
    assert scores.top1_agreement == 1.0
    assert scores.mean_kl == pytest.approx(0.0, abs=1e-9)
    assert scores.per_probe_kl.shape == (len(world_probes),)
    assert judge(scores, None, DriftThresholds()).passed


def test_batching_does_not_change_the_scores(
    micro_model: PreTrainedModel,
    micro_tokenizer: Any,
    world_probes: list[Probe],
    base_scores: BaseScores,
) -> None:
    """Left padding with mask-derived positions: one by one equals batched (up to rounding)."""
    single = score_base(micro_model, micro_tokenizer, world_probes[:12], k=16, batch_size=1)
    assert torch.equal(single.top1, base_scores.top1[:12])
    assert torch.allclose(single.topk_logprobs, base_scores.topk_logprobs[:12], atol=1e-4)
    scores = score_edited(
        micro_model, micro_tokenizer, world_probes[:12], single, null_routing, batch_size=5
    )
    assert scores.top1_agreement == 1.0
    assert scores.mean_kl < 1e-6


def test_noise_in_one_mlp_weight_lowers_agreement_and_raises_kl(
    micro_model: PreTrainedModel,
    micro_tokenizer: Any,
    world_probes: list[Probe],
    base_scores: BaseScores,
) -> None:
    """A damaged MLP projection shows up as drift, and the verdict fails."""
    damaged = copy.deepcopy(micro_model)
    weight = arch.projection_weight_out_in(arch.mlp_out_module(cast(nn.Module, damaged), 0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight.add_(torch.randn(weight.shape, generator=generator) * weight.std() * 4.0)
    scores = score_edited(
        damaged, micro_tokenizer, world_probes, base_scores, null_routing, batch_size=16
    )
    assert scores.top1_agreement < 0.9
    assert scores.mean_kl > 0.05
    assert bool((scores.per_probe_kl > 0).all())
    verdict = judge(scores, 1.0, DriftThresholds())
    assert not verdict.passed and verdict.reasons


def test_top1_agreement_on_model_logits(
    micro_model: PreTrainedModel,
    micro_tokenizer: Any,
    world_probes: list[Probe],
    base_scores: BaseScores,
) -> None:
    """The pure function agrees with the base scores on the model's own log-probs."""
    rows = [
        lp
        for _, lp in last_token_logprobs(
            micro_model, micro_tokenizer, world_probes, null_routing, 16
        )
    ]
    assert top1_agreement(base_scores.top1, torch.cat(rows)) == 1.0


class RecordingRouting:
    """Records the prompts of each routing context and checks forwards run inside one."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[list[str]] = []
        self.active: list[str] | None = None
        self.forwards: list[list[str]] = []
        model.register_forward_pre_hook(self._pre_hook)

    def _pre_hook(self, _module: nn.Module, _inputs: Any) -> None:
        assert self.active is not None, "forward outside the routing context"
        self.forwards.append(list(self.active))

    @contextmanager
    def _route(self, prompts: Sequence[str]) -> Iterator[None]:
        self.calls.append(list(prompts))
        self.active = list(prompts)
        try:
            yield
        finally:
            self.active = None

    def __call__(self, prompts: Sequence[str]) -> Any:
        return self._route(prompts)


def test_routing_receives_each_batch_in_row_order(
    micro_model: PreTrainedModel,
    micro_tokenizer: Any,
    world_probes: list[Probe],
    base_scores: BaseScores,
) -> None:
    """Every forward runs inside routing(prompts) with exactly that batch's prompts."""
    model = copy.deepcopy(micro_model)
    routing = RecordingRouting(cast(nn.Module, model))
    probes = world_probes[:10]
    score_base(model, micro_tokenizer, probes, routing, k=4, batch_size=4)
    expected = [[p.prompt for p in probes[s : s + 4]] for s in (0, 4, 8)]
    assert routing.calls == expected
    assert routing.forwards == expected
    routing.calls.clear()
    routing.forwards.clear()
    score_edited(model, micro_tokenizer, world_probes, base_scores, routing, batch_size=16)
    assert routing.calls == [[p.prompt for p in world_probes[s : s + 16]] for s in (0, 16, 32)]
    assert routing.forwards == routing.calls


def test_score_edited_refuses_stale_base_scores(
    micro_model: PreTrainedModel,
    micro_tokenizer: Any,
    world_probes: list[Probe],
    base_scores: BaseScores,
) -> None:
    """Scores for another probe set are never compared row by row."""
    with pytest.raises(StaleBaseScoresError):
        score_edited(micro_model, micro_tokenizer, world_probes[1:], base_scores, null_routing)


def test_scoring_restores_training_mode(
    micro_model: PreTrainedModel, micro_tokenizer: Any, world_probes: list[Probe]
) -> None:
    """Forwards run in eval mode; a model in training mode is put back afterwards."""
    model = copy.deepcopy(micro_model)
    cast(nn.Module, model).train()
    seen: list[bool] = []
    cast(nn.Module, model).register_forward_pre_hook(lambda m, _i: seen.append(m.training))
    score_base(model, micro_tokenizer, world_probes[:3], k=4)
    assert seen == [False] and model.training
    with pytest.raises(ValueError, match="batch_size"):
        score_base(model, micro_tokenizer, world_probes[:3], batch_size=0)
    with pytest.raises(ValueError, match="no probes"):
        score_base(model, micro_tokenizer, [])
