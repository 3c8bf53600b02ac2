"""The drift math against naive float64 references, and the verdict."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.config import DriftConfig
from daemon.drift.probes import summarise, tail_logmass
from daemon.drift.scoring import (
    DriftScores,
    DriftThresholds,
    DriftVerdict,
    judge,
    kl_base_edited,
    top1_agreement,
)


def log_dist(n: int, v: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n, v, generator=g) * scale, dim=-1)


def naive_bucketed_kl(p_full: torch.Tensor, q_full: torch.Tensor, k: int) -> list[float]:
    """KL over the base's top-k ids plus one tail bucket, by loops in float64."""
    out = []
    for p_row, q_row in zip(p_full.double().exp(), q_full.double().exp(), strict=True):
        ids = torch.topk(p_row, k).indices.tolist()
        rest = [i for i in range(p_row.shape[0]) if i not in ids]
        total = sum(float(p_row[i]) * math.log(float(p_row[i]) / float(q_row[i])) for i in ids)
        p_tail = sum(float(p_row[i]) for i in rest)
        q_tail = sum(float(q_row[i]) for i in rest)
        if p_tail > 0:
            total += p_tail * math.log(p_tail / q_tail)
        out.append(total)
    return out


def kl_from_full(base: torch.Tensor, edited: torch.Tensor, k: int) -> torch.Tensor:
    _, values, ids, tail = summarise(base, k)
    return kl_base_edited(values, ids, tail, edited)


def test_tail_logmass_matches_the_complement() -> None:
    """log(1 - sum of the top-k probabilities), computed without cancellation."""
    logprobs = log_dist(4, 50, seed=1)
    _, values, _ids, tail = summarise(logprobs, 10)
    expected = torch.log1p(-values.double().exp().sum(-1))
    assert torch.allclose(tail.double(), expected, atol=1e-5)


def test_tail_is_minus_infinity_when_k_covers_the_vocabulary() -> None:
    """k >= V: no tail mass (and k is capped at V)."""
    logprobs = log_dist(3, 8, seed=2)
    _, values, ids, tail = summarise(logprobs, 64)
    assert values.shape == (3, 8)
    assert torch.isneginf(tail).all()
    assert torch.isneginf(tail_logmass(logprobs, ids)).all()


def test_kl_equals_the_full_kl_when_k_covers_the_vocabulary() -> None:
    """With every id in the top k the approximation is the exact KL(base || edited)."""
    p, q = log_dist(5, 12, seed=3), log_dist(5, 12, seed=4)
    exact = (p.double().exp() * (p.double() - q.double())).sum(-1)
    assert torch.allclose(kl_from_full(p, q, 12), exact, atol=1e-6)


def test_kl_matches_the_naive_bucketed_reference() -> None:
    """k < V: the k + 1 bucket KL, checked against loops in float64."""
    p, q = log_dist(6, 40, seed=5), log_dist(6, 40, seed=6)
    got = kl_from_full(p, q, 7)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(naive_bucketed_kl(p, q, 7), abs=1e-5)


def test_kl_is_exactly_zero_for_identical_distributions() -> None:
    """edited == base gives exactly 0 for every row, for any k."""
    p = log_dist(8, 100, seed=7)
    for k in (1, 5, 64, 100):
        assert torch.equal(kl_from_full(p, p.clone(), k), torch.zeros(8, dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=10_000),
    k=st.integers(min_value=1, max_value=30),
    scale=st.floats(min_value=0.1, max_value=12.0),
)
def test_kl_is_non_negative_and_a_lower_bound(seed: int, k: int, scale: float) -> None:
    """Bucketing never yields a negative KL nor one above the full KL (data processing)."""
    p, q = log_dist(4, 30, seed, scale), log_dist(4, 30, seed + 1, scale)
    approx = kl_from_full(p, q, k)
    full = (p.double().exp() * (p.double() - q.double())).sum(-1)
    assert (approx >= 0).all()
    assert (approx <= full + 1e-6).all()


def test_kl_ignores_base_tokens_with_zero_probability() -> None:
    """A base log-prob of -inf contributes 0, not NaN."""
    p = torch.log(torch.tensor([[0.5, 0.5, 0.0, 0.0]]))
    q = torch.log(torch.tensor([[0.25, 0.25, 0.25, 0.25]]))
    got = kl_from_full(p, q, 3)
    assert got.tolist() == pytest.approx([math.log(2.0)])


def test_kl_rejects_mismatched_shapes() -> None:
    """Shapes must line up row by row."""
    p = log_dist(2, 10, seed=8)
    _, values, ids, tail = summarise(p, 3)
    with pytest.raises(ValueError):
        kl_base_edited(values, ids[:, :2], tail, p)
    with pytest.raises(ValueError):
        kl_base_edited(values, ids, tail[:1], p)
    with pytest.raises(ValueError):
        kl_base_edited(values, ids, tail, p[:1])


def test_top1_agreement() -> None:
    """The fraction of rows whose argmax is the base's top-1."""
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    assert top1_agreement(torch.tensor([1, 0, 2, 0]), logits) == 1.0
    assert top1_agreement(torch.tensor([1, 1, 2, 2]), logits) == 0.5
    with pytest.raises(ValueError):
        top1_agreement(torch.tensor([1]), logits)
    with pytest.raises(ValueError):
        top1_agreement(torch.zeros(0, dtype=torch.long), torch.zeros(0, 3))


def scores(top1: float, kl: float) -> DriftScores:
    return DriftScores(top1, kl, torch.tensor([kl], dtype=torch.float64), 1)


def test_judge_passes_within_thresholds() -> None:
    """Agreement and retention at the minimum, KL at the maximum: passed, no reasons."""
    t = DriftThresholds(min_top1_agreement=0.9, max_mean_kl=0.1, min_retention=0.8)
    assert judge(scores(0.9, 0.1), 0.8, t) == DriftVerdict(True, ())
    assert judge(scores(1.0, 0.0), None, t) == DriftVerdict(True, ())


def test_judge_names_every_failure() -> None:
    """Each violated threshold adds one reason."""
    t = DriftThresholds(min_top1_agreement=0.9, max_mean_kl=0.1, min_retention=0.8)
    verdict = judge(scores(0.5, 0.3), 0.2, t)
    assert not verdict.passed
    assert len(verdict.reasons) == 3
    assert "top-1 agreement 0.5000" in verdict.reasons[0]
    assert "mean KL 0.300000" in verdict.reasons[1]
    assert "retention 0.2000" in verdict.reasons[2]


def test_judge_fails_on_nan() -> None:
    """NaN scores never pass."""
    t = DriftThresholds()
    verdict = judge(scores(float("nan"), float("nan")), float("nan"), t)
    assert not verdict.passed and len(verdict.reasons) == 3


def test_thresholds_validate_and_come_from_config() -> None:
    """Fractions in [0, 1], KL non-negative; from_config copies the [drift] keys."""
    with pytest.raises(ValueError, match="min_top1_agreement"):
        DriftThresholds(min_top1_agreement=1.5)
    with pytest.raises(ValueError, match="max_mean_kl"):
        DriftThresholds(max_mean_kl=-0.1)
    cfg = DriftConfig(min_top1_agreement=0.8, max_mean_kl=0.2, min_retention=0.7)
    assert DriftThresholds.from_config(cfg) == DriftThresholds(0.8, 0.2, 0.7)


def test_scores_to_json() -> None:
    """The JSON summary carries the two numbers and the probe count."""
    assert scores(0.75, 0.5).to_json() == {"top1_agreement": 0.75, "mean_kl": 0.5, "n": 1}
