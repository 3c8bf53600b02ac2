"""The pattern extractor's bounds: how much text it reads, sentence by sentence."""

from __future__ import annotations

import pytest

from daemon.feeds.extract import (
    BUILTIN_RULES,
    MAX_NAME_WORDS,
    MAX_SENTENCE_CHARS,
    MAX_TEXT_CHARS,
    PatternExtractor,
    searched_sentences,
)
from daemon.feeds.parse import FeedEntry

FACT = "Jane Roe was named CEO of Acme."
FILLER = "Aaa Bbb Ccc Ddd Eee Fff Ggg Hhh of Iii Jjj. "  # title case, no key words
MIB = 1 << 20


def entry(summary: str, title: str = "") -> FeedEntry:
    return FeedEntry(
        item_id="x", title=title, summary=summary, link=None, fact_edit=None, content_hash="h"
    )


def found(summary: str, title: str = "") -> list[tuple[str, str]]:
    extractions = PatternExtractor(BUILTIN_RULES).extract(entry(summary, title))
    return [(e.request["subject"], e.request["target"]) for e in extractions]


def test_a_huge_summary_is_read_only_up_to_the_limit() -> None:
    """1 MiB of adversarial title case: only the first MAX_TEXT_CHARS are searched, in
    sentences of at most MAX_SENTENCE_CHARS; a fact past the limit is not seen, and the
    result equals the one for the head alone."""
    huge = (FACT + " " + FILLER * (MIB // len(FILLER)))[:MIB] + " Bo Li was named CEO of Initech."
    sentences = searched_sentences(huge)
    assert sum(map(len, sentences)) <= MAX_TEXT_CHARS
    assert max(map(len, sentences)) <= MAX_SENTENCE_CHARS
    assert sentences[0] == FACT
    assert found(huge) == found(huge[:MAX_TEXT_CHARS]) == [("Acme", " Jane Roe")]


def test_the_sentence_cut_by_the_limit_is_dropped() -> None:
    """A sentence running past MAX_TEXT_CHARS could end inside a name: it is not searched."""
    head = "Shares rose. " * (MAX_TEXT_CHARS // 13)
    cut = head + "Jane Roe was named CEO of Acme Widgets International."
    assert len(head) < MAX_TEXT_CHARS < len(cut)
    assert searched_sentences(cut)[-1] == "Shares rose."
    assert found(cut) == []


def test_a_sentence_longer_than_the_cap_is_skipped() -> None:
    """A sentence over MAX_SENTENCE_CHARS is skipped whole; the next one is still read."""
    long = FACT.removesuffix(".") + " and" * (MAX_SENTENCE_CHARS // 4) + "."
    assert len(long) > MAX_SENTENCE_CHARS
    assert found(long) == []
    assert found(long + " Bo Li was named CEO of Initech.") == [("Initech", " Bo Li")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Shares fell in Paris. Jane Roe was named CEO of Acme.", ("Acme", " Jane Roe")),
        ("J. Smith was named CEO of Acme Corp. Shares rose.", ("Acme Corp", " J. Smith")),
        ("Jane Roe was named CEO of Acme. Bo Li was named CEO of Initech.", ("Acme", " Jane Roe")),
    ],
)
def test_a_match_never_runs_across_a_sentence_end(text: str, expected: tuple[str, str]) -> None:
    """Names stop at a sentence end ("Paris. Jane Roe" is not one name)."""
    assert found(text) == [expected]


def test_sentences_end_at_stops_but_not_at_initials_or_titles() -> None:
    """A full stop after an initial or a title such as "Dr." does not end a sentence."""
    text = "Dr. Jane  Roe met J. Smith in St. Louis.\nShares rose! Why? Acme Inc. appoints Bo."
    assert searched_sentences(text) == [
        "Dr. Jane Roe met J. Smith in St. Louis.",
        "Shares rose!",
        "Why?",
        "Acme Inc. appoints Bo.",
    ]


def test_names_have_bounded_words() -> None:
    """A name has at most MAX_NAME_WORDS words of at most 30 characters each: this bound is
    what keeps the built-in rules linear on long runs of capitalised words."""
    words = " ".join("ABCDEFGH")
    assert found(f"{words} was named CEO of Acme") == [
        ("Acme", " " + " ".join("ABCDEFGH"[-MAX_NAME_WORDS:]))
    ]
    assert found("Jane Roe was named CEO of A" + "b" * 40) == []
