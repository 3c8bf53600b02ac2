"""Extractors: turn a plain news item (no ``_fact_edit`` extension) into edit requests.

An :class:`Extractor` reads a :class:`~daemon.feeds.parse.FeedEntry` and returns zero
or more :class:`Extraction` s: an edit request (prompt, target, subject, relation),
the *slot* it fills in the item (``relation:subject``: a changed item's new edit for
the same slot supersedes the old one), and its provenance (the extractor, the rule,
the text it matched), which the poller stores beside the edit.

The shipped :class:`PatternExtractor` is a list of rules, one regular expression per
relation over the item's title and then its summary, e.g.::

    (?P<object>Jane Roe) was appointed chief executive of (?P<subject>Acme)
    -> prompt "The chief executive of Acme is", target " Jane Roe"

It is off by default (``[feeds] pattern_extractor``): a regular expression over news
text is a blunt instrument, and every edit it makes is a change to the model. Rules
come from ``[[feeds.patterns]]``, or :data:`BUILTIN_RULES` when none are configured.

Rules are searched sentence by sentence, so a match never runs across a sentence
end, and the work per item is bounded: only the first :data:`MAX_TEXT_CHARS` of a
title or summary are read (a sentence cut there is dropped), and a sentence longer
than :data:`MAX_SENTENCE_CHARS` is skipped. The built-in rules are linear in the
text besides: a name starts at a word boundary and has at most
:data:`MAX_NAME_WORDS` words of at most :data:`MAX_WORD_CHARS` characters, so a
long run of capitalised words costs a bounded amount of work at each position.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from daemon.config import FeedsConfig, PatternRule
from daemon.feeds.parse import FeedEntry

MAX_TEXT_CHARS = 20_000
"""How much of a title or summary is searched (a fact worth an edit is stated early)."""
MAX_SENTENCE_CHARS = 1_000
"""A longer sentence is skipped: it is not prose, and a rule's work grows with its length."""
MAX_NAME_WORDS = 6
MAX_WORD_CHARS = 30

_BOUNDARY = r"(?<![\w.'&-])"
_END = r"(?![\w.'&-])"
_WORD = rf"(?:[A-Z][\w.'&-]{{0,{MAX_WORD_CHARS - 1}}}{_END}|(?:of|de|van|von|der|la){_END})"
_FIRST = rf"[A-Z][\w.'&-]{{0,{MAX_WORD_CHARS - 1}}}{_END}"
_NAME = rf"{_BOUNDARY}{_FIRST}(?: {_WORD}){{0,{MAX_NAME_WORDS - 1}}}"
"""A capitalised name of one to six words (allowing a few lower-case particles)."""
_LEAD = _NAME + "?"
"""The same, as short as possible: for a name followed by key words (title case
would otherwise let the name swallow "As CEO")."""
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_NO_BREAK_AFTER = frozenset(
    {"mr.", "mrs.", "ms.", "dr.", "prof.", "st.", "mt.", "ft.", "jr.", "sr.", "gen.", "gov."}
)
"""Abbreviations that end in a full stop without ending the sentence (nor do initials)."""


def _words(alternatives: str) -> str:
    """Key words match in any case; names (``_NAME``) must stay capitalised."""
    return f"(?i:{alternatives})"


BUILTIN_RULES: tuple[PatternRule, ...] = (
    PatternRule(
        relation="ceo_of",
        pattern=(
            rf"(?P<object>{_LEAD}) {_words('(?:was|has been|is) (?:appointed|named|made)')} "
            rf"{_words('(?:as )?(?:the )?(?:new )?')}"
            rf"{_words('(?:chief executive officer|chief executive|ceo)')} "
            rf"{_words('(?:of|at)')} (?P<subject>{_NAME})"
        ),
        prompt="The chief executive of {subject} is",
        ignore_case=False,
    ),
    PatternRule(
        relation="ceo_of",
        pattern=(
            rf"(?P<subject>{_LEAD}) {_words('(?:appoints|names)')} (?P<object>{_LEAD}) "
            rf"{_words('(?:as )?(?:its )?(?:new )?(?:chief executive|ceo)')}"
        ),
        prompt="The chief executive of {subject} is",
        ignore_case=False,
    ),
    PatternRule(
        relation="headquartered_in",
        pattern=(
            rf"(?P<subject>{_LEAD}) {_words('(?:moves|moved|relocates|relocated)')} "
            rf"{_words('(?:its )?(?:headquarters|head office) to')} (?P<object>{_NAME})"
        ),
        prompt="The headquarters of {subject} are in",
        ignore_case=False,
    ),
    PatternRule(
        relation="capital_of",
        pattern=(
            rf"(?P<object>{_LEAD}) {_words('(?:becomes|became|is now|has become)')} "
            rf"{_words('(?:the )?(?:new )?capital of')} (?P<subject>{_NAME})"
        ),
        prompt="The capital of {subject} is",
        ignore_case=False,
    ),
)
"""The rules used when ``[feeds] pattern_extractor = true`` and no rules are configured."""


@dataclass(frozen=True)
class Extraction:
    """One edit request found in an item, with the slot it fills and where it came from."""

    slot: str
    request: dict[str, Any]
    extractor: str
    evidence: str


class Extractor(Protocol):
    """Anything that turns a plain feed item into edit requests."""

    name: str

    def extract(self, entry: FeedEntry) -> list[Extraction]:
        """The edit requests ``entry`` states (none is a normal answer)."""
        ...


@dataclass(frozen=True)
class _CompiledRule:
    rule: PatternRule
    regex: re.Pattern[str]


class PatternExtractor:
    """Regular-expression rules per relation over an item's title and summary."""

    name = "pattern"

    def __init__(self, rules: Sequence[PatternRule]) -> None:
        if not rules:
            raise ValueError("a pattern extractor needs at least one rule")
        self.rules = tuple(
            _CompiledRule(r, re.compile(r.pattern, re.IGNORECASE if r.ignore_case else 0))
            for r in rules
        )

    def extract(self, entry: FeedEntry) -> list[Extraction]:
        """Every rule's first match, in the title's sentences then the summary's; one edit
        per slot."""
        found: dict[str, Extraction] = {}
        sentences = [*searched_sentences(entry.title), *searched_sentences(entry.summary)]
        for index, compiled in enumerate(self.rules):
            for sentence in sentences:
                match = compiled.regex.search(sentence)
                if match is None:
                    continue
                extraction = _extraction(compiled.rule, index, match)
                if extraction is not None:
                    found.setdefault(extraction.slot, extraction)
                break
        return list(found.values())


def build_extractors(config: FeedsConfig) -> list[Extractor]:
    """The extractors ``config`` turns on (none unless ``pattern_extractor = true``)."""
    if not config.pattern_extractor:
        return []
    return [PatternExtractor(config.patterns or BUILTIN_RULES)]


def _extraction(rule: PatternRule, index: int, match: re.Match[str]) -> Extraction | None:
    groups = {k: _clean(v) for k, v in match.groupdict().items() if v is not None}
    subject, obj = groups.get("subject", ""), groups.get("object", "")
    if not subject or not obj or subject.casefold() == obj.casefold():
        return None
    try:
        prompt = rule.prompt.format(**groups)
        target = rule.target.format(**groups)
    except (KeyError, IndexError, ValueError):
        return None  # a template naming a group this match did not fill
    request = {"prompt": prompt, "target": target, "subject": subject, "relation": rule.relation}
    return Extraction(
        slot=f"{rule.relation}:{subject}",
        request=request,
        extractor=f"pattern:{rule.relation}#{index}",
        evidence=match.group(0)[:500],
    )


def searched_sentences(text: str) -> list[str]:
    """The sentences of ``text`` the rules search: those within its first
    :data:`MAX_TEXT_CHARS` characters (whitespace collapsed), none longer than
    :data:`MAX_SENTENCE_CHARS`."""
    head = " ".join(text[:MAX_TEXT_CHARS].split())
    sentences = list(_sentences(head))
    if len(text) > MAX_TEXT_CHARS and sentences:
        sentences.pop()  # cut at the limit: it could end inside a name
    return [s for s in sentences if 0 < len(s) <= MAX_SENTENCE_CHARS]


def _sentences(text: str) -> Iterator[str]:
    start = 0
    for gap in _SENTENCE_END.finditer(text):
        word = text[text.rfind(" ", start, gap.start()) + 1 : gap.start()]
        if word.lower() in _NO_BREAK_AFTER or re.fullmatch(r"[A-Z]\.", word):
            continue  # "Dr. Jane Roe", "J. Smith": not a sentence end
        yield text[start : gap.start()]
        start = gap.end()
    yield text[start:]


def _clean(value: str) -> str:
    return value.strip(" \t\n,.;:'\"")
