"""Isolating the edits that damaged the model: bisection over groups, independent of models.

After a failed drift check the caller restores the last good checkpoint and
hands the later items (edits, or batches of edits) here in their original
order. ``isolate_damaging`` re-applies them in halves on top of that good state:

- a segment known to be unhealthy is split; its first half is applied and
  probed. Healthy: the half is kept, and the second half is then known to be
  unhealthy (the whole was, the first half is not), so it is split in turn
  without a probe of its own. Unhealthy: the half is undone and searched
  recursively, and the second half is probed afresh afterwards.
- a segment of at most ``min_group`` items that is unhealthy on top of
  everything kept so far is reported as culprits, whole.

Every culprit is confirmed by a probe run: a segment is blamed only after it
was applied on top of the kept items and the model was unhealthy. An inference
("the second half must be bad") only ever saves the probe of a segment that is
then split, so a flaky or non-reproducible failure makes the algorithm keep
items, never blame innocent ones.

Order: segments are processed left to right and kept segments stay applied, so
the kept items are always applied in their original relative order; a culprit
is undone (``undo`` with exactly the items of the failed ``apply``) before
anything later is applied.

Complexity: with ``c`` culprits among ``n`` items, each culprit costs at most
two probes per level of the halving tree (its own half, and the sibling half
that must be probed afresh once it is found), so ``O(c log n)`` probe runs: at
most ``2 * ceil(log2 n) + 1`` for a single culprit (``log2 n + 1`` when it is last),
never more than ``2n`` in all. With
``assume_unhealthy=False`` the whole sequence is probed once first, so a
failure that does not reproduce costs one run and keeps everything.

Interactions: health is a property of the whole applied set, so two items
harmful only together are split by whichever halving separates them. The
earlier one is applied alone first, found healthy and kept; the later one then
makes the model unhealthy and is reported as the culprit. In general the
culprit is the item whose application, on top of the items kept before it,
first breaks health: the later member of an interacting pair, never both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from daemon.log import get_logger

T = TypeVar("T")
log = get_logger(__name__)


@dataclass(frozen=True)
class IsolationResult(Generic[T]):
    """The outcome: ``kept`` (applied at the end, in order), ``culprits`` (not applied)."""

    kept: list[T] = field(default_factory=list)
    culprits: list[T] = field(default_factory=list)
    probe_runs: int = 0


@dataclass
class _Search(Generic[T]):
    """The mutable state of one isolation: what is kept, what is blamed, probes spent."""

    apply: Callable[[Sequence[T]], None]
    undo: Callable[[Sequence[T]], None]
    is_healthy: Callable[[], bool]
    min_group: int
    kept: list[T] = field(default_factory=list)
    culprits: list[T] = field(default_factory=list)
    probe_runs: int = 0

    def try_segment(self, segment: Sequence[T]) -> bool:
        """Apply ``segment`` and probe; keep it when healthy, else undo it. Returns health."""
        self.apply(segment)
        self.probe_runs += 1
        healthy = self.is_healthy()
        log.debug("isolation_probed", size=len(segment), healthy=healthy, run=self.probe_runs)
        if healthy:
            self.kept.extend(segment)
        else:
            self.undo(segment)
        return healthy

    def search(self, segment: Sequence[T], known_unhealthy: bool) -> bool:
        """Resolve ``segment`` on top of the kept items; True when all of it was kept."""
        if not segment:
            return True
        small = len(segment) <= self.min_group
        if not known_unhealthy or small:
            # Probe it (a small segment is always probed, so every culprit is confirmed).
            if self.try_segment(segment):
                return True
            if small:
                self.culprits.extend(segment)
                return False
        mid = len(segment) // 2
        first_kept = self.search(segment[:mid], known_unhealthy=False)
        self.search(segment[mid:], known_unhealthy=first_kept)
        return False


def isolate_damaging(
    groups_in_order: Sequence[T],
    apply: Callable[[Sequence[T]], None],
    is_healthy: Callable[[], bool],
    *,
    undo: Callable[[Sequence[T]], None],
    min_group: int = 1,
    assume_unhealthy: bool = True,
) -> IsolationResult[T]:
    """Re-apply ``groups_in_order`` in halves and find the items that make the model unhealthy.

    The caller has already restored the last good state. ``apply(items)`` applies
    items on top of the current state (always a contiguous run, in order);
    ``undo(items)`` retracts exactly the items of the last ``apply``;
    ``is_healthy()`` runs the probes. ``min_group`` is the size below which an
    unhealthy segment is blamed whole instead of split further. With
    ``assume_unhealthy`` (the default: a drift run just failed with all of them)
    the full sequence is not probed before splitting. Exceptions from the
    callables propagate. See the module doc for order, cost and interactions.
    """
    if min_group < 1:
        raise ValueError(f"min_group must be >= 1, got {min_group}")
    search: _Search[T] = _Search(apply, undo, is_healthy, min_group)
    search.search(list(groups_in_order), known_unhealthy=assume_unhealthy)
    log.info(
        "isolation_finished",
        items=len(groups_in_order),
        kept=len(search.kept),
        culprits=len(search.culprits),
        probe_runs=search.probe_runs,
    )
    return IsolationResult(list(search.kept), list(search.culprits), search.probe_runs)
