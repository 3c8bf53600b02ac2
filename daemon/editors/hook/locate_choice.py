"""Choosing the key position and hook layers from traced evidence, and the result.

The choosing half of :mod:`daemon.editors.hook.locate`: ``choose`` ranks a
:class:`~daemon.editors.hook.locate_trace.LocateEvidence` by the rule below, and
:class:`LocateResult` holds the choice with its evidence and provenance; it is
what the locate cache persists (``to_json``/``from_json``, ``LOCATE_FORMAT_VERSION``).

The choice (``choose``)
-----------------------
- key position: the kind whose ``mlp_out`` patches move the most answers summed
  over all layers; ties go to the ``residual`` moved sum, then the ``mlp_out``
  probability sum, then to ``subject_last``.
- hook layers: the contiguous window of ``window`` layers (default
  ``round(L / 4)``, at least 2 from L = 4; never starting at layer 0 from L = 4,
  see ``first_candidate_layer``) with the highest ``mlp_out`` moved sum at that kind;
  ties go to the higher ``mlp_out`` probability sum, then the higher ``residual``
  moved sum, then the DEEPER window (the scope gate separates subjects better in
  deeper layers; see :mod:`daemon.editors.hook.layer`).

Why ``mlp_out`` leads: the residual stream at the prompt's last token in the last
layer IS the prediction, so patching it moves every answer by construction, and
late residual layers there score high on any model. The MLP output at one layer
is what a hook edit can change. ``LocateEvidence.layer_scores`` and
``best_window`` let an editor choose differently (e.g. away from MELO's layers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from daemon.editors.hook.locate_trace import LocateEvidence
from daemon.editors.hook.patching import KINDS, PositionKind
from daemon.errors import LocateError

LOCATE_FORMAT_VERSION = 1


def default_window(n_layers: int) -> int:
    """How many hook layers to choose by default: ``round(L / 4)``, at least 2 from
    L = 4 (spreading an update over two layers halves each layer's share), else 1."""
    return max(2 if n_layers >= 4 else 1, round(n_layers / 4))


def first_candidate_layer(n_layers: int) -> int:
    """Layer 0 is a candidate only in models of fewer than 4 layers.

    The MLP input at layer 0 is the token embedding mixed by one attention layer:
    measured on the small world, locality prompts sit as close to an edit's key
    there as rephrases do (centred cosine q90 0.62 at layer 0 against 0.25-0.29 at
    layers 1-3), so a layer-0 scope gate cannot tell them apart, even though
    patching layer 0's MLP moves the most answers.
    """
    return 1 if n_layers >= 4 else 0


# --- the choice ----------------------------------------------------------------------


def _total(values: Sequence[float]) -> float:
    return round(sum(values), 9)  # exact ties despite float summation order


def choose_key_position(evidence: LocateEvidence) -> PositionKind:
    """The kind whose ``mlp_out`` patches move most answers (ties: module doc)."""

    def rank(kind: PositionKind) -> tuple[float, float, float]:
        mlp, res = evidence.scores["mlp_out"][kind], evidence.scores["residual"][kind]
        return _total(mlp.moved), _total(res.moved), _total(mlp.donor_prob)

    return max(KINDS, key=rank)  # max keeps the first of equals: subject_last


def best_window(evidence: LocateEvidence, kind: PositionKind, window: int) -> tuple[int, ...]:
    """The contiguous ``window`` layers with the most ``mlp_out`` moves at ``kind``."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    size = min(window, evidence.n_layers)
    mlp, res = evidence.scores["mlp_out"][kind], evidence.scores["residual"][kind]
    best: tuple[tuple[float, float, float], int] | None = None
    start = min(first_candidate_layer(evidence.n_layers), evidence.n_layers - size)
    for first in range(start, evidence.n_layers - size + 1):
        span = slice(first, first + size)
        rank = (_total(mlp.moved[span]), _total(mlp.donor_prob[span]), _total(res.moved[span]))
        if best is None or rank >= best[0]:  # >=: ties go to the deeper window
            best = (rank, first)
    assert best is not None  # size <= n_layers, so the loop ran
    return tuple(range(best[1], best[1] + size))


def choose(
    evidence: LocateEvidence, window: int | None = None
) -> tuple[PositionKind, tuple[int, ...]]:
    """Key position and hook layers by the rule in the module docstring."""
    kind = choose_key_position(evidence)
    size = default_window(evidence.n_layers) if window is None else window
    return kind, best_window(evidence, kind, size)


# --- the result ----------------------------------------------------------------------


@dataclass(frozen=True)
class LocateResult:
    """The chosen key position and hook layers, with the evidence behind them."""

    key_position: PositionKind
    layers: tuple[int, ...]
    evidence: LocateEvidence
    model_id: str
    fingerprint: str
    n_pairs: int
    seconds: float
    window: int
    facts_sha256: str

    def layout(self) -> tuple[tuple[int, ...], PositionKind]:
        """``(layers, key_position)``, the shape ``build_hook_editor(located=...)`` takes."""
        return self.layers, self.key_position

    def rechoose(self, window: int | None) -> LocateResult:
        """The same evidence with the choice remade for another window."""
        size = default_window(self.evidence.n_layers) if window is None else window
        kind, layers = choose(self.evidence, size)
        return replace(self, key_position=kind, layers=layers, window=size)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "evidence"}
        out.update(version=LOCATE_FORMAT_VERSION, layers=list(self.layers))
        out["evidence"] = self.evidence.to_json()
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LocateResult:
        """Parse ``to_json`` output; raises ``LocateError`` on another version or bad data."""
        if not isinstance(data, Mapping) or data.get("version") != LOCATE_FORMAT_VERSION:
            raise LocateError(
                f"unsupported locate result (expected version {LOCATE_FORMAT_VERSION})"
            )
        try:
            kind = data["key_position"]
            if kind not in KINDS:
                raise ValueError(f"unknown key_position {kind!r}")
            return cls(
                key_position=kind,
                layers=tuple(int(i) for i in data["layers"]),
                evidence=LocateEvidence.from_json(data["evidence"]),
                model_id=str(data["model_id"]),
                fingerprint=str(data["fingerprint"]),
                n_pairs=int(data["n_pairs"]),
                seconds=float(data["seconds"]),
                window=int(data["window"]),
                facts_sha256=str(data["facts_sha256"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise LocateError(f"malformed locate result: {e!r}") from e
