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
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from daemon.config import FeedsConfig, PatternRule
from daemon.feeds.parse import FeedEntry

_NAME = r"[A-Z][\w.'&-]*(?: (?:[A-Z][\w.'&-]*|of|de|van|von|der|la))*"
"""A capitalised name of one or more words (allowing a few lower-case particles)."""
_LEAD = _NAME[:-1] + "*?"
"""The same, as short as possible: for a name followed by key words (title case
would otherwise let the name swallow "As CEO")."""


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
        """Every rule's first match in the title, else in the summary; one edit per slot."""
        found: dict[str, Extraction] = {}
        for index, compiled in enumerate(self.rules):
            for text in (entry.title, entry.summary):
                match = compiled.regex.search(_one_line(text))
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


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _clean(value: str) -> str:
    return value.strip(" \t\n,.;:'\"")
