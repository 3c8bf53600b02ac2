"""Drift scores of an edited model against the base model's stored ``BaseScores``, and the verdict.

Two numbers per probe set (see ``docs/contracts.md``, "Drift validation"):

- top-1 agreement: the fraction of probes whose most likely next token is the
  base model's (ties broken by ``argmax``, the same rule ``score_base`` uses);
- mean KL(base || edited) of the next-token distributions at the last prompt
  token, approximated from the stored summary (``kl_base_edited``).

``judge`` compares them, and the retention of a sample of applied edits, with
``DriftThresholds`` and explains every failure in words.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from daemon.config import DriftConfig
from daemon.drift.probes import BaseScores, Probe, Routing, last_token_logprobs, tail_logmass
from daemon.log import get_logger

log = get_logger(__name__)


# --- pure math --------------------------------------------------------------------------


def top1_agreement(base_top1: torch.Tensor, edited_logits_last: torch.Tensor) -> float:
    """Fraction of rows where ``argmax(edited_logits_last)`` equals ``base_top1``.

    ``base_top1`` is ``(N,)`` long, ``edited_logits_last`` ``(N, V)`` (logits or
    log-probs: the argmax is the same). Raises ``ValueError`` for no rows.
    """
    if base_top1.shape[0] != edited_logits_last.shape[0]:
        raise ValueError(f"{base_top1.shape[0]} base rows vs {edited_logits_last.shape[0]} edited")
    if base_top1.shape[0] == 0:
        raise ValueError("no rows to compare")
    same = edited_logits_last.argmax(dim=-1) == base_top1.to(edited_logits_last.device)  # (N,)
    return float(same.double().mean())


def kl_base_edited(
    base_topk_logprobs: torch.Tensor,
    base_topk_ids: torch.Tensor,
    base_tail_logmass: torch.Tensor,
    edited_logprobs_full: torch.Tensor,
) -> torch.Tensor:
    """KL(base || edited) per row over k + 1 buckets: the base's top-k ids and "the rest".

    Shapes: ``(N, k)``, ``(N, k)`` long, ``(N,)``, ``(N, V)`` (edited log-probs,
    normalised) -> ``(N,)`` float64.

    The approximation: both distributions are coarsened to the same k + 1
    outcomes, the base's k most likely tokens and one tail bucket holding all
    other tokens (the base's stored tail mass vs the edited model's mass outside
    those k ids). That is an exact KL between two distributions on k + 1
    outcomes, so it is >= 0 and exactly 0 when edited == base; by the
    data-processing inequality it never exceeds the true KL, and it misses only
    changes of shape *inside* the tail, where the base puts little mass. Terms
    where the base puts zero mass contribute 0; rounding negatives clamp to 0.
    """
    if base_topk_logprobs.shape != base_topk_ids.shape:
        raise ValueError("top-k log-probs and ids must have the same shape")
    if base_tail_logmass.shape != base_topk_logprobs.shape[:1]:
        raise ValueError("tail log-mass must have one entry per row")
    if edited_logprobs_full.shape[0] != base_topk_ids.shape[0]:
        raise ValueError("base and edited row counts differ")
    edited = edited_logprobs_full.float()
    ids = base_topk_ids.to(edited.device)
    q_k = edited.gather(-1, ids).double()  # (N, k)
    q_tail = tail_logmass(edited, ids).double()  # (N,)
    p_k = base_topk_logprobs.to(edited.device).double()  # (N, k)
    p_tail = base_tail_logmass.to(edited.device).double()  # (N,)
    log_p = torch.cat([p_k, p_tail.unsqueeze(-1)], dim=-1)  # (N, k + 1)
    log_q = torch.cat([q_k, q_tail.unsqueeze(-1)], dim=-1)  # (N, k + 1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))  # (N, k + 1)
    return terms.sum(dim=-1).clamp_min(0.0)


# --- scoring an edited model ------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DriftScores:
    """How far the edited model moved on the probes."""

    top1_agreement: float
    mean_kl: float
    per_probe_kl: torch.Tensor  # (n,) float64
    n: int

    def to_json(self) -> dict[str, Any]:
        """The summary (without per-probe values) for reports and the store."""
        return {"top1_agreement": self.top1_agreement, "mean_kl": self.mean_kl, "n": self.n}


def score_edited(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    probes: Sequence[Probe],
    base: BaseScores,
    routing: Routing,
    batch_size: int = 32,
) -> DriftScores:
    """Score the (edited) model on ``probes`` against ``base``, batch by batch.

    Raises ``StaleBaseScoresError`` when ``base`` was computed for other probes.
    """
    base.check_probes(probes)
    agree = 0
    kls: list[torch.Tensor] = []
    for start, logprobs in last_token_logprobs(model, tokenizer, probes, routing, batch_size):
        rows = slice(start, start + logprobs.shape[0])
        agree += int((logprobs.argmax(dim=-1) == base.top1[rows]).sum())
        kls.append(
            kl_base_edited(
                base.topk_logprobs[rows], base.topk_ids[rows], base.tail_logmass[rows], logprobs
            )
        )
    per_probe = torch.cat(kls)
    scores = DriftScores(
        top1_agreement=agree / len(probes),
        mean_kl=float(per_probe.mean()),
        per_probe_kl=per_probe,
        n=len(probes),
    )
    log.info(
        "drift_scored",
        probes=scores.n,
        top1_agreement=round(scores.top1_agreement, 4),
        mean_kl=round(scores.mean_kl, 6),
    )
    return scores


# --- the verdict ------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftThresholds:
    """Pass marks: agreement and retention at least, mean KL at most."""

    min_top1_agreement: float = 0.97
    max_mean_kl: float = 0.05
    min_retention: float = 0.9

    def __post_init__(self) -> None:
        for name in ("min_top1_agreement", "min_retention"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not self.max_mean_kl >= 0.0:
            raise ValueError(f"max_mean_kl must be >= 0, got {self.max_mean_kl}")

    @classmethod
    def from_config(cls, config: DriftConfig) -> DriftThresholds:
        return cls(config.min_top1_agreement, config.max_mean_kl, config.min_retention)


@dataclass(frozen=True)
class DriftVerdict:
    """Whether the edited model passed, and why not (empty ``reasons`` when it did)."""

    passed: bool
    reasons: tuple[str, ...] = ()


def judge(
    scores: DriftScores, retention: float | None, thresholds: DriftThresholds
) -> DriftVerdict:
    """Compare scores (and retention; None: no edits to sample) with the thresholds.

    A NaN anywhere fails: a broken model must never pass for lack of a number.
    """
    reasons: list[str] = []
    if not scores.top1_agreement >= thresholds.min_top1_agreement:
        reasons.append(
            f"top-1 agreement {scores.top1_agreement:.4f} is below "
            f"{thresholds.min_top1_agreement:.4f}"
        )
    if math.isnan(scores.mean_kl) or scores.mean_kl > thresholds.max_mean_kl:
        reasons.append(f"mean KL {scores.mean_kl:.6f} is above {thresholds.max_mean_kl:.6f}")
    if retention is not None and not retention >= thresholds.min_retention:
        reasons.append(f"retention {retention:.4f} is below {thresholds.min_retention:.4f}")
    return DriftVerdict(passed=not reasons, reasons=tuple(reasons))
