"""The hook layer's scope gate: which stored key (and so which shard) a token belongs to.

Pure functions and one cache of derived tensors; ``HookedProjection``
(:mod:`daemon.editors.hook.layer`) owns the buffers and calls :func:`route_tokens`.

Scope gate
----------
The hook stores the keys of its edits, ``keys`` ``(m, d_in)`` fp32 (one row per key
site; rows can be removed for retraction). For a token with key ``x`` and stored key
``k_j`` the score is the *centred* cosine similarity::

    c_j(x) = cos(x - mu, k_j - mu)

where ``mu`` (``center``) is the mean key of non-edit text: centring removes the
component every MLP activation shares, which otherwise makes all cosines large.
Each key has its **own** reference: the mean and standard deviation of ``c_j`` over
the calibration tokens (``key_mean``, ``key_std``, persisted). Key ``j`` is eligible
for ``x`` where::

    (c_j(x) - key_mean_j) / key_std_j >= max(threshold, threshold_floor)
    and c_j(x) >= cos_floor

and the gate routes ``x`` to the shard of the eligible key with the largest cosine.
A per-key reference does not move when other keys are added or removed, so the gate
on an early edit is the same after a thousand later edits (a reference pooled over
all keys, ``max_j c_j`` of non-edit tokens, rose with every key until the edits'
own prompts fell below it). The cosine floor keeps prompts that merely share an
edit's template (other subject, same words) out: on the small world (hook layers 2-3,
prompt-last keys, 1000 edits) the best-matching key of a locality prompt has a
centred cosine of .52-.79 at layer 2 (q10-q90) and .42-.66 at layer 3, a
training-template rephrase .76-.99 and .63-.98; a floor of 0.7 measured efficacy
.98, paraphrase .72, locality .93 (0.5: locality .78; 0.8: locality .99,
paraphrase .65).

Cost: the normalised centred keys ``(m, d_in)`` are cached and rebuilt only when the
keys, the centre, the references or the thresholds change, not per forward. On a CPU
with bf16 dot products (AVX512-BF16) a bf16 pre-filter scores every token against
every key, the key's threshold folded in as one more column, and keeps the (token,
key) pairs within ``_PREFILTER_MARGIN`` of the threshold; the float32 cosines and the
rule above then run on those tokens and keys alone, so the routing is the one the
float32 scores give. The margin covers bf16 rounding: unit vectors rounded to bf16
(relative error ``2**-8`` per entry) move a cosine by at most ``2**-7 + 2**-16``
(Cauchy-Schwarz), the threshold column by ``2**-9``, fp32 accumulation by ~1e-4, and
rounding the result keeps its sign: about .010 in all against a margin of .03. On the
small world (1,613 keys of width 512, cosine floor .7) 7% of the tokens and 0.1 keys
per token pass. Deltas are applied to the routed tokens only, one matmul per shard.

Subject gate
------------
With a subject scope (:mod:`daemon.editors.hook.scope`) a token is scored only
against the keys of the edits whose subject occurs in its sequence up to it
(:mod:`daemon.editors.hook.subject_gate`), with the same z rule and a lower floor
(``DEFAULT_SUBJECT_COS_FLOOR``): other subjects' keys are never candidates, so the
floor only has to reject the same subject under another relation. On the small
world (300 edits, hook layers 2-3, the edit's own keys) those probes reach a centred
cosine of .27/.24 (median, layers 2/3, q95 .44/.45) while training-template
rephrases reach .94/.91 (q05 .64/.44). At 1000 edits (batch 10) every locality
probe the subject gate lets change is one whose subject some edit changed under
another relation (50 of 2,040 probes); prompts about unedited subjects never open
it. Floor .4 / .5 / .6 at 300 edits: paraphrase .937 / .928 / .906, locality
.986 / .993 / .998. The right floor depends on the model; ``gate_subject_cos_floor =
"auto"`` calibrates it from the model's own keys (:mod:`daemon.editors.hook.floor`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

DEFAULT_THRESHOLD = 3.0
"""Default z-score threshold of the scope gate (against each key's own reference)."""

DEFAULT_THRESHOLD_FLOOR = 2.0
"""The z threshold never goes below this, whatever an adaptive update asks for."""

DEFAULT_COS_FLOOR = 0.7
"""A key fires only where its centred cosine reaches this, whatever its z-score."""

DEFAULT_SUBJECT_COS_FLOOR = 0.55
"""The cosine floor of the subject gate, among the candidate edits' keys only."""

_STD_EPS = 1e-6
PREFILTER_MARGIN = 0.03  # above the bf16 error bound of the module docstring
_PREFILTER_MIN_KEYS = 64  # below this many keys the float32 scores are cheap enough
_NEVER = 4.0  # a threshold no cosine reaches (keys without a reference)


def key_reference(
    tokens: torch.Tensor, keys: torch.Tensor, center: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-key mean and std of the centred cosine of ``tokens`` ``(N, d)`` to ``keys`` ``(m, d)``.

    Pure function; float64 accumulation, float32 results ``(m,)`` each.
    """
    tn = nn.functional.normalize(tokens.double() - center.double(), dim=-1)  # (N, d)
    kn = nn.functional.normalize(keys.double() - center.double(), dim=-1)  # (m, d)
    cos = tn @ kn.T  # (N, m)
    mean = cos.mean(dim=0)
    std = cos.var(dim=0, unbiased=False).clamp(min=0).sqrt().clamp(min=_STD_EPS)
    return mean.float(), std.float()


def bf16_dot_products(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively (fp32 accumulation)."""
    if device.type != "cpu":
        return False
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe()) if callable(probe) else False


def tensor_stamp(t: torch.Tensor) -> tuple[int, int]:
    """Identity and in-place version of a tensor (version -1 where it cannot be read)."""
    try:
        version = int(getattr(t, "_version", -1))
    except RuntimeError:  # inference tensors keep no version counter
        version = -1
    return id(t), version


class GateCache:
    """What the gate derives from the keys and thresholds; the hook rebuilds it only when
    ``stamp`` (identities, in-place versions and threshold values) changes."""

    def __init__(
        self,
        stamp: tuple[Any, ...],
        keys: torch.Tensor,
        center: torch.Tensor,
        key_mean: torch.Tensor,
        key_std: torch.Tensor,
        limit: float,
        cos_floor: float,
    ) -> None:
        self.stamp = stamp
        self.sources: tuple[torch.Tensor, ...] = (keys, center, key_mean, key_std)  # kept alive
        self.limit = limit
        self.cos_floor = cos_floor
        self.keys_n = nn.functional.normalize(keys - center, dim=-1)  # (m, d)
        reach = torch.maximum(
            key_mean.double() + limit * key_std.double(),
            torch.tensor(cos_floor, dtype=torch.float64, device=keys.device),
        )  # (m,): the least cosine at which each key is eligible; NaN: never
        reach = torch.nan_to_num(reach, nan=_NEVER).clamp(max=_NEVER)
        self.any_reachable = bool((reach <= 1.0 + 1e-4).any())  # float32 cosines reach 1 + eps
        self.prefilter: torch.Tensor | None = None  # (m, d + 1) bf16: [key, -threshold]
        if keys.shape[0] >= _PREFILTER_MIN_KEYS and bf16_dot_products(keys.device):
            shifted = (-(reach - PREFILTER_MARGIN)).to(self.keys_n.dtype).unsqueeze(1)
            self.prefilter = torch.cat([self.keys_n, shifted], dim=1).to(torch.bfloat16)


def decide(
    xn: torch.Tensor,
    keys_n: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    shard: torch.Tensor,
    limit: float,
    cos_floor: float,
) -> torch.Tensor:
    """Shard per unit token key ``(n, d)`` from its float32 cosines to ``keys_n`` (-1: closed).

    Pure function. The eligible key with the largest cosine wins, the lowest key index
    among equal cosines (``argmax``'s first); NaN references never make a key eligible.
    """
    cos = xn @ keys_n.T  # (n, c)
    eligible = ((cos - mean) / std >= limit) & (cos >= cos_floor)
    best, nearest = torch.where(eligible, cos, torch.full_like(cos, float("-inf"))).max(dim=-1)
    return torch.where(torch.isfinite(best), shard[nearest], torch.full_like(nearest, -1))


def route_tokens(
    xn: torch.Tensor,
    cache: GateCache,
    key_mean: torch.Tensor,
    key_std: torch.Tensor,
    key_shard: torch.Tensor,
) -> torch.Tensor:
    """Shard per centred unit token key ``xn`` ``(N, d)`` (-1: closed), through the bf16
    pre-filter when the cache has one: the exact rule then runs only on the tokens and
    keys within the margin, and decides exactly as on all of them."""
    closed = torch.full((xn.shape[0],), -1, dtype=torch.long, device=xn.device)
    if cache.prefilter is None:
        return decide(xn, cache.keys_n, key_mean, key_std, key_shard, cache.limit, cache.cos_floor)
    pad = nn.functional.pad(xn, (0, 1), value=1.0).to(torch.bfloat16)  # (N, d + 1)
    near = pad @ cache.prefilter.T  # (N, m): bf16 cosine minus (threshold - margin)
    rows = (near.amax(dim=-1) >= 0).nonzero().squeeze(1)  # tokens near some key
    if rows.numel() == 0:
        return closed
    if rows.numel() < near.shape[0]:
        near = near.index_select(0, rows)
    cols = (near.amax(dim=0) >= 0).nonzero().squeeze(1)  # keys near any of those tokens
    decided = decide(
        xn.index_select(0, rows),
        cache.keys_n.index_select(0, cols),
        key_mean[cols],
        key_std[cols],
        key_shard[cols],
        cache.limit,
        cache.cos_floor,
    )
    return closed.index_copy(0, rows, decided)
