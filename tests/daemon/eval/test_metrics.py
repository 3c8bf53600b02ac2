"""The metric functions on hand-made cases."""

from __future__ import annotations

import pytest
import torch

from daemon.eval.metrics import (
    fraction_or_none,
    generation_scores,
    mean,
    probability_wins,
    target_logit_positions,
    teacher_forced_token_accuracy,
)
from daemon.model.answers import continuation_matches, reply_mentions


@pytest.mark.parametrize(
    ("continuation", "target", "expected"),
    [
        (" Jane Roe, who", " Jane Roe", True),  # a correct continuation
        (" Jane Roe", " Jane Roe", True),  # exactly the target, nothing after
        (" John Doe", " Jane Roe", False),  # a wrong one
        (" Jane Roeberts", " Jane Roe", False),  # a prefix of a longer word is not a match
        (" Jane", " Jane Roe", False),  # stopped short of the target
        ("Jane Roe.", " Jane Roe", True),  # tokenizer put the space in the prompt
        ("  Jane Roe", "Jane Roe", True),  # extra leading whitespace
        (" Jane Roe's company", " Jane Roe", True),  # punctuation after the word is fine
        (" Paris-based", " Paris", True),  # a hyphen ends the word
        (" 1999s", " 1999", False),
        (" Roe.", " Roe.", True),  # target ending in punctuation
        (" Roe.x", " Roe.", True),
        ("", " Jane", False),
        (" anything", "   ", False),  # an empty target never matches
    ],
)
def test_continuation_matches(continuation: str, target: str, expected: bool) -> None:
    assert continuation_matches(continuation, target) is expected


def test_generation_scores_elementwise_and_length_checked() -> None:
    assert generation_scores([" a b", " c"], [" a", " d"]) == [True, False]
    with pytest.raises(ValueError, match="2 continuations for 1 targets"):
        generation_scores([" a", " b"], [" a"])


def test_teacher_forced_token_accuracy_counts_argmax_hits() -> None:
    logits = torch.tensor([[0.1, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert teacher_forced_token_accuracy(logits, torch.tensor([1, 0, 2])) == 1.0
    assert teacher_forced_token_accuracy(logits, torch.tensor([1, 2, 2])) == pytest.approx(2 / 3)
    assert teacher_forced_token_accuracy(logits, torch.tensor([0, 2, 0])) == 0.0


def test_teacher_forced_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match="expected logits"):
        teacher_forced_token_accuracy(torch.zeros(2, 3), torch.tensor([1]))
    with pytest.raises(ValueError, match="empty target"):
        teacher_forced_token_accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_target_logit_positions_are_shifted_by_one() -> None:
    # prompt of 4 tokens, target of 2: logits at positions 3 and 4 predict tokens 4 and 5
    assert target_logit_positions(4, 2).tolist() == [3, 4]
    with pytest.raises(ValueError):
        target_logit_positions(0, 2)


def test_mean_and_fraction() -> None:
    assert mean([True, False, True, True]) == 0.75
    assert fraction_or_none([]) is None
    with pytest.raises(ValueError):
        mean([])


def test_probability_wins_compare_mean_nlls() -> None:
    assert probability_wins([0.1, 2.0, 1.0], [0.5, 1.0, 1.0]) == [True, False, False]
    with pytest.raises(ValueError, match="2 likelihoods against 1"):
        probability_wins([0.1, 0.2], [0.3])


@pytest.mark.parametrize(
    ("reply", "target", "expected"),
    [
        ("Paris.", " Paris", True),
        ("The Eiffel Tower is in Paris, France.", " Paris", True),  # restated question
        ("It is in PARIS", " Paris", True),  # case does not matter
        ("A Parisian landmark.", " Paris", False),  # part of a longer word
        ("Not in Lyon or Nice", " Paris", False),
        ("He speaks Jane Roe's language", "Jane Roe", True),
        ("", " Paris", False),
        ("anything", "  ", False),  # an empty target names nothing
        ("C++ and C", " C++", True),  # a target ending in punctuation
        ("Xenon Paris", " Paris", True),  # a later occurrence after a failed one
    ],
)
def test_reply_mentions(reply: str, target: str, expected: bool) -> None:
    assert reply_mentions(reply, target) is expected
