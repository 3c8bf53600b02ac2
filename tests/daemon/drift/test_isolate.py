"""Bisection of damaging items against a fake model state (a list of applied items)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.drift.isolate import IsolationResult, isolate_damaging


@dataclass
class FakeModel:
    """Applied items in application order; unhealthy when ``harmful(applied)`` says so."""

    harmful: Callable[[list[int]], bool]
    applied: list[int] = field(default_factory=list)
    last_apply: list[int] = field(default_factory=list)
    calls: list[tuple[str, list[int]]] = field(default_factory=list)

    def apply(self, items: Sequence[int]) -> None:
        self.applied.extend(items)
        self.last_apply = list(items)
        self.calls.append(("apply", list(items)))

    def undo(self, items: Sequence[int]) -> None:
        assert list(items) == self.last_apply, "undo must retract exactly the last apply"
        assert self.applied[-len(items) :] == list(items)
        del self.applied[-len(items) :]
        self.calls.append(("undo", list(items)))

    def is_healthy(self) -> bool:
        return not self.harmful(self.applied)

    def run(self, items: Sequence[int], **kwargs: object) -> IsolationResult[int]:
        return isolate_damaging(
            items,
            self.apply,
            self.is_healthy,
            undo=self.undo,
            **kwargs,  # type: ignore[arg-type]
        )


def with_culprits(*bad: int) -> FakeModel:
    return FakeModel(lambda applied: any(b in applied for b in bad))


def check_invariants(model: FakeModel, items: list[int], result: IsolationResult[int]) -> None:
    """Every item ends kept or blamed once; kept are applied, in original order."""
    assert sorted(result.kept + result.culprits) == sorted(items)
    assert model.applied == result.kept
    assert result.kept == [i for i in items if i in set(result.kept)]
    assert model.is_healthy()


@pytest.mark.parametrize(
    ("n", "bad"),
    [
        (8, ()),
        (8, (0,)),
        (8, (7,)),
        (8, (3,)),
        (8, (0, 7)),
        (9, (2, 3)),
        (1, (0,)),
        (1, ()),
        (13, (5, 11)),
        (5, (0, 1, 2, 3, 4)),
    ],
)
def test_finds_exactly_the_culprits(n: int, bad: tuple[int, ...]) -> None:
    """0, 1, 2 or all culprits, at the edges or inside, are found; everything else is kept."""
    items = list(range(n))
    model = with_culprits(*bad)
    result = model.run(items)
    assert result.culprits == list(bad)
    check_invariants(model, items, result)


def test_no_items() -> None:
    """Nothing to isolate costs no probe run."""
    model = with_culprits()
    assert model.run([]) == IsolationResult([], [], 0)


def test_single_culprit_costs_about_log_n_runs() -> None:
    """One culprit among 1024: at most 2 log2(n) + 1 runs wherever it sits, log2(n) + 1 if last."""
    items = list(range(1024))
    for bad in (0, 1, 511, 512, 1023):
        result = with_culprits(bad).run(items)
        assert result.culprits == [bad]
        assert result.probe_runs <= 2 * math.log2(len(items)) + 1
    assert with_culprits(1023).run(items).probe_runs == math.log2(len(items)) + 1


def test_culprit_count_bounds_probe_runs() -> None:
    """c culprits cost O(c log n) runs; all culprits never more than 2n."""
    items = list(range(256))
    result = with_culprits(3, 100, 200).run(items)
    assert result.culprits == [3, 100, 200]
    assert result.probe_runs <= 3 * (2 * math.log2(256) + 1)
    everything = with_culprits(*items).run(items)
    assert everything.culprits == items and everything.probe_runs <= 2 * len(items)


def test_interacting_pair_blames_the_later_item() -> None:
    """Items 2 and 5 are harmful only together: 2 (earlier) is kept, 5 is the culprit.

    The halving separates them; 2 is applied without 5 and found healthy, then 5
    breaks health on top of it. The algorithm terminates and never blames both.
    """
    items = list(range(8))
    model = FakeModel(lambda applied: 2 in applied and 5 in applied)
    result = model.run(items)
    assert result.culprits == [5]
    check_invariants(model, items, result)


def test_interacting_pair_in_one_small_group_is_blamed_together() -> None:
    """With min_group=2 a pair that shares a leaf group is blamed as that group."""
    items = list(range(8))
    model = FakeModel(lambda applied: 4 in applied and 5 in applied)
    result = model.run(items, min_group=2)
    assert result.culprits == [4, 5]
    check_invariants(model, items, result)


def test_min_group_blames_whole_groups_with_fewer_runs() -> None:
    """A larger min_group stops splitting early: the culprit's group is blamed whole."""
    items = list(range(16))
    fine = with_culprits(9).run(items)
    coarse_model = with_culprits(9)
    coarse = coarse_model.run(items, min_group=4)
    assert fine.culprits == [9]
    assert 9 in coarse.culprits and len(coarse.culprits) <= 4
    assert coarse.probe_runs < fine.probe_runs
    check_invariants(coarse_model, items, coarse)


def test_flaky_failure_blames_nothing() -> None:
    """A failure that does not reproduce keeps every item (culprits are always confirmed)."""
    items = list(range(10))
    model = with_culprits()
    result = model.run(items)
    assert result.culprits == []
    check_invariants(model, items, result)
    probed = model.run([], assume_unhealthy=False)
    assert probed.probe_runs == 0


def test_probing_the_whole_first_when_not_assumed_unhealthy() -> None:
    """assume_unhealthy=False spends one run on the whole and stops when it is healthy."""
    model = with_culprits()
    result = model.run(list(range(10)), assume_unhealthy=False)
    assert result == IsolationResult(list(range(10)), [], 1)
    assert model.calls == [("apply", list(range(10)))]


def test_applies_contiguous_runs_in_order() -> None:
    """Every apply is a contiguous run of the input, after every item kept before it."""
    items = list(range(12))
    model = with_culprits(4, 10)
    model.run(items)
    applies = [chunk for kind, chunk in model.calls if kind == "apply"]
    for chunk in applies:
        start = items.index(chunk[0])
        assert chunk == items[start : start + len(chunk)]


def test_generic_items() -> None:
    """Items may be anything (here: batches of edit ids)."""
    batches = [("e1", "e2"), ("e3",), ("e4", "e5"), ("e6",)]
    applied: list[tuple[str, ...]] = []

    def undo(items: Sequence[tuple[str, ...]]) -> None:
        del applied[-len(items) :]

    result = isolate_damaging(
        batches, applied.extend, lambda: ("e4", "e5") not in applied, undo=undo
    )
    assert result.culprits == [("e4", "e5")]
    assert result.kept == [("e1", "e2"), ("e3",), ("e6",)]


def test_rejects_bad_min_group() -> None:
    """min_group below 1 is refused."""
    with pytest.raises(ValueError, match="min_group"):
        with_culprits().run([1], min_group=0)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(min_value=0, max_value=40),
    bad=st.sets(st.integers(min_value=0, max_value=39), max_size=6),
    min_group=st.integers(min_value=1, max_value=4),
)
def test_property_independent_culprits(n: int, bad: set[int], min_group: int) -> None:
    """Independent culprits are always blamed; with min_group=1 exactly them."""
    items = list(range(n))
    truth = sorted(b for b in bad if b < n)
    model = with_culprits(*truth)
    result = model.run(items, min_group=min_group)
    check_invariants(model, items, result)
    assert set(truth) <= set(result.culprits)
    if min_group == 1:
        assert result.culprits == truth
