"""Parse a fetched feed (JSON Feed 1.x, Atom, RSS) into entries that may carry a fact edit.

A feed item carries an edit request in an extension: the edit request fields
(``prompt``, ``target``, ``subject``, ``relation``, ``rephrases``, ``locality``,
``backend``, ``schedule``, ``id``, ``supersedes``, ...) plus ``op``: ``"update"``
(the default, filled in when absent) or ``"retract"``. This module checks only the
structure (an object; a known ``op``); the intake validates the fields and records
rejects. A malformed item becomes an :class:`ItemError` and never stops the others;
a document that is no feed at all raises :class:`FeedParseError`.

JSON Feed (content type ``application/feed+json`` / ``application/json`` or a body
starting with ``{``; ``version`` must start with ``https://jsonfeed.org/version/1``)
uses the item extension object ``_fact_edit``; ids that are numbers become strings::

    {"version": "https://jsonfeed.org/version/1.1", "title": "Acme news",
     "items": [{"id": "42", "title": "New CEO", "content_text": "Jane Roe takes over.",
                "url": "https://acme.example/news/42",
                "_fact_edit": {"op": "update", "prompt": "The chief executive of Acme is",
                               "target": " Jane Roe", "subject": "Acme",
                               "rephrases": ["Acme's CEO is"]}}]}

Atom and RSS 2.0 (read with feedparser: id/guid, else link; title; summary or
content; link) carry the element ``fact_edit`` in the namespace
``https://editd.dev/ns/fact-edit/1`` (bound to any prefix) inside an entry or item.
Its children are the fields; ``rephrase`` and ``locality`` repeat::

    <entry xmlns:fe="https://editd.dev/ns/fact-edit/1">
      <id>urn:acme:42</id><title>New CEO</title><link href="https://acme.example/news/42"/>
      <fe:fact_edit>
        <fe:prompt>The chief executive of Acme is</fe:prompt>
        <fe:target> Jane Roe</fe:target>
        <fe:subject>Acme</fe:subject>
        <fe:rephrase>Acme's CEO is</fe:rephrase>
        <fe:rephrase>Acme is led by</fe:rephrase>
        <fe:locality>
          <fe:prompt>The chief executive of Initech is</fe:prompt>
          <fe:target> Bill Lumbergh</fe:target>
        </fe:locality>
      </fe:fact_edit>
    </entry>

or hold one JSON object as text (``type="application/json"``, or text starting with ``{``)::

    <fe:fact_edit type="application/json">{"op": "retract", "id": "acme-ceo"}</fe:fact_edit>

Whitespace rule for the element form: a ``target`` (also inside ``locality``) is
taken exactly as written, because its leading space is meaningful to the model
(``<fe:target> Jane Roe</fe:target>`` gives ``" Jane Roe"``); write it on one line,
with nothing around the value you do not mean (``&#32;`` works too). Every other
field is stripped of leading and trailing whitespace. The JSON forms take every
string as written.

Titles and summaries are plain text: HTML tags are removed, entities decoded and
runs of whitespace collapsed to one space. ``content_hash`` is the SHA-256 of a
canonical JSON of (fact_edit, title, summary, link), so it changes exactly when
the item's content does, whichever of the equivalent forms carried it.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any
from xml.etree.ElementTree import Element
from xml.parsers.expat import ExpatError

import feedparser
import structlog

from daemon.errors import FeedParseError
from daemon.feeds import factxml
from daemon.feeds.factxml import FACT_EDIT_NS, ExtensionError, UnsafeXmlError

__all__ = [
    "FACT_EDIT_NS",
    "FeedEntry",
    "FeedParseError",
    "ItemError",
    "ParsedFeed",
    "content_hash",
    "html_to_text",
    "parse_feed",
]

log = structlog.get_logger()

JSONFEED_VERSION_PREFIX = "https://jsonfeed.org/version/1"
_JSON_TYPES = frozenset({"application/feed+json", "application/json"})
_OPS = ("update", "retract")


@dataclass(frozen=True)
class FeedEntry:
    """One usable feed item."""

    item_id: str
    title: str
    summary: str
    link: str | None
    fact_edit: Mapping[str, Any] | None  # the extension's fields with "op"; None when absent
    content_hash: str


@dataclass(frozen=True)
class ItemError:
    """A malformed item: where it was, its id if it had one, and why it was skipped."""

    index: int
    item_id: str | None
    reason: str


@dataclass(frozen=True)
class ParsedFeed:
    """A parsed document: the good entries and the reasons for the bad ones."""

    format: str  # "jsonfeed" | "atom" | "rss"
    title: str | None
    entries: tuple[FeedEntry, ...]
    item_errors: tuple[ItemError, ...]


class _BadItem(ValueError):
    """Raised while reading one item; becomes an :class:`ItemError`."""


@dataclass(frozen=True)
class _Item:
    """What a format reader found in one item, before checks shared by all formats."""

    index: int
    item_id: str | None
    title: str
    summary: str
    link: str | None
    fact_edit: object  # None, or what the extension held (checked by _check_fact_edit)
    problem: str | None = None


def parse_feed(body: bytes, content_type: str | None = None) -> ParsedFeed:
    """Parse a JSON Feed, Atom or RSS document; see the module docstring."""
    head = body.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    media_type = (content_type or "").split(";")[0].strip().lower()
    if head == b"{" or (head != b"<" and media_type in _JSON_TYPES):
        fmt, title, items = "jsonfeed", *_read_jsonfeed(body)
    else:
        fmt, title, items = _read_xml(body)
    entries, errors = _collect(items)
    log.debug("feed_parsed", format=fmt, entries=len(entries), item_errors=len(errors))
    return ParsedFeed(fmt, title, tuple(entries), tuple(errors))


def _collect(items: Iterable[_Item]) -> tuple[list[FeedEntry], list[ItemError]]:
    """Apply the shared checks (id, extension structure, duplicates) to every item."""
    entries: list[FeedEntry] = []
    errors: list[ItemError] = []
    first_at: dict[str, int] = {}
    for item in items:
        try:
            if item.problem is not None:
                raise _BadItem(item.problem)
            if not item.item_id:
                raise _BadItem("item has no id")
            fact_edit = _check_fact_edit(item.fact_edit)
            if item.item_id in first_at:
                raise _BadItem(f"duplicate id (first used by the item at {first_at[item.item_id]})")
        except _BadItem as exc:
            errors.append(ItemError(item.index, item.item_id, str(exc)))
            continue
        first_at[item.item_id] = item.index
        digest = content_hash(fact_edit, item.title, item.summary, item.link)
        entries.append(
            FeedEntry(item.item_id, item.title, item.summary, item.link, fact_edit, digest)
        )
    return entries, errors


def _check_fact_edit(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _BadItem(f"fact_edit must be an object, not {_kind(value)}")
    op = value.get("op", "update")
    if op not in _OPS:
        raise _BadItem(f"fact_edit op must be 'update' or 'retract', not {op!r}")
    return {**value, "op": op}


def content_hash(
    fact_edit: Mapping[str, Any] | None, title: str, summary: str, link: str | None
) -> str:
    """SHA-256 hex of the canonical JSON of an item's content (keys sorted, ASCII)."""
    canonical = json.dumps(
        {"fact_edit": fact_edit, "title": title, "summary": summary, "link": link},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


# --- JSON Feed -----------------------------------------------------------------------


def _read_jsonfeed(body: bytes) -> tuple[str | None, list[_Item]]:
    try:
        doc = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise FeedParseError(f"not valid JSON: {exc}", format="jsonfeed") from exc
    if not isinstance(doc, dict):
        raise FeedParseError(f"a JSON Feed is an object, not {_kind(doc)}", format="jsonfeed")
    version = doc.get("version")
    if not isinstance(version, str) or not version.startswith(JSONFEED_VERSION_PREFIX):
        raise FeedParseError(
            f"not a JSON Feed 1.x: version is {version!r}, expected {JSONFEED_VERSION_PREFIX!r}"
            " or a 1.x after it",
            format="jsonfeed",
        )
    raw_items = doc.get("items")
    if not isinstance(raw_items, list):
        raise FeedParseError(f"'items' must be a list, not {_kind(raw_items)}", format="jsonfeed")
    title = doc.get("title")
    return (_plain(title) if isinstance(title, str) else None), [
        _json_item(i, raw) for i, raw in enumerate(raw_items)
    ]


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json_item(index: int, raw: object) -> _Item:
    item_id: str | None = None
    try:
        if not isinstance(raw, dict):
            raise _BadItem(f"item must be an object, not {_kind(raw)}")
        item_id = _json_id(raw.get("id"))
        title = _plain(_json_text(raw, "title"))
        summary = _json_text(raw, "summary") or _json_text(raw, "content_text")
        summary = _plain(summary) if summary else html_to_text(_json_text(raw, "content_html"))
        link = _json_text(raw, "url") or _json_text(raw, "external_url") or None
    except _BadItem as exc:
        return _Item(index, item_id, "", "", None, None, problem=str(exc))
    return _Item(index, item_id, title, summary, link, raw.get("_fact_edit"))


def _json_id(value: object) -> str | None:
    """The spec: a string; a number is converted. Missing or empty gives None."""
    if isinstance(value, bool) or (value is not None and not isinstance(value, str | int | float)):
        raise _BadItem(f"id must be a string, not {_kind(value)}")
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text or None


def _json_text(raw: Mapping[str, object], key: str) -> str:
    value = raw.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _BadItem(f"'{key}' must be a string, not {_kind(value)}")
    return value


# --- Atom and RSS --------------------------------------------------------------------


def _read_xml(body: bytes) -> tuple[str, str | None, list[_Item]]:
    # A stream, never the bytes: feedparser.parse() tries a bytes argument as a file name.
    try:
        parsed = feedparser.parse(io.BytesIO(body))
    except Exception as exc:  # a third-party parser on hostile input: no crash may escape
        raise FeedParseError(f"feedparser failed: {type(exc).__name__}: {exc}") from exc
    entries = parsed.get("entries") or []
    try:
        root = factxml.strict_tree(body, parsed.get("encoding"))
    except UnsafeXmlError as exc:
        raise FeedParseError(f"refused: {exc}") from exc
    except (ExpatError, ValueError) as exc:
        # Not well-formed: feedparser's lenient reading may still be usable, but only
        # when no item can hold an extension (that needs the strict tree).
        if FACT_EDIT_NS.encode() in body:
            raise FeedParseError(f"malformed XML, fact_edit unreadable: {exc}") from exc
        if not parsed.get("version") or not entries:
            raise FeedParseError(f"not a JSON Feed, Atom or RSS document: {exc}") from exc
        log.warning("feed_xml_recovered", error=str(exc), entries=len(entries))
        fmt = "atom" if str(parsed.get("version")).startswith("atom") else "rss"
        elements: list[Element] = []
    else:
        found = factxml.root_format(root)
        if found is None:
            raise FeedParseError(f"not a JSON Feed, Atom or RSS document (root <{root.tag}>)")
        fmt, elements = found, factxml.feed_items(root)
    title = parsed.get("feed", {}).get("title")
    return fmt, (html_to_text(title) if title else None), list(_xml_items(fmt, entries, elements))


def _xml_items(fmt: str, entries: list[Any], elements: list[Element]) -> Iterator[_Item]:
    """Pair feedparser's entries with their elements: by position, else by id."""
    by_key: dict[str, Element] = {}
    if len(elements) != len(entries):
        for candidate in elements:
            by_key.setdefault(factxml.item_key(candidate) or "", candidate)
    for index, entry in enumerate(entries):
        link = _entry_link(fmt, entry)
        item_id = str(entry.get("id") or "").strip() or link
        element: Element | None
        if len(elements) == len(entries):
            element = elements[index]
        else:
            element = by_key.get(item_id) if item_id else None
        try:
            fact_edit = factxml.read_fact_edit(element) if element is not None else None
        except ExtensionError as exc:
            yield _Item(index, item_id or None, "", "", None, None, problem=str(exc))
            continue
        title = html_to_text(entry.get("title") or "")
        content = entry.get("content") or [{}]
        summary = html_to_text(entry.get("summary") or content[0].get("value") or "")
        problem = None if item_id else "item has no id, guid or link"
        yield _Item(index, item_id or None, title, summary, link, fact_edit, problem)


def _entry_link(fmt: str, entry: Any) -> str | None:
    """The entry's alternate link; for RSS, else a permalink guid that is an http(s) URL.

    feedparser's own ``entry.link`` falls back to the id (``guidislink``), which would
    make an Atom ``urn:`` id or an RSS ``guid`` like ``g2`` look like a link.
    """
    for link in entry.get("links") or []:
        href = str(link.get("href") or "").strip()
        if href and link.get("rel", "alternate") == "alternate":
            return href
    guid = str(entry.get("id") or "").strip()
    if fmt == "rss" and entry.get("guidislink") and guid.startswith(("http://", "https://")):
        return guid
    return None


# --- text ----------------------------------------------------------------------------


class _TextOnly(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in ("br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6"):
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """Plain text of an HTML fragment: tags dropped, entities decoded, whitespace collapsed."""
    parser = _TextOnly()
    parser.feed(markup)
    parser.close()
    return _plain("".join(parser.parts))


def _plain(text: str) -> str:
    return " ".join(text.split())


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else f"a {type(value).__name__}"
    )
