"""The XML side of the fact-edit extension: a safe namespace-aware tree and the element reader.

feedparser flattens unknown namespaces (``fe_prompt``), keeps only the last of
repeated elements and strips whitespace, so :mod:`daemon.feeds.parse` reads the
``<fe:fact_edit>`` elements with this module instead: :func:`strict_tree` parses
the raw body with expat (no DTD loading, no entity declarations, so no external
or exponential entities), :func:`feed_items` lists the entries or items in
document order, and :func:`read_fact_edit` turns one item's element into a dict.
The element format and its whitespace rule are documented in ``parse.py``.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any
from xml.parsers.expat import XML_PARAM_ENTITY_PARSING_NEVER, ParserCreate

FACT_EDIT_NS = "https://editd.dev/ns/fact-edit/1"

ATOM_NS = "http://www.w3.org/2005/Atom"
_ITEM_NAMESPACES = frozenset(
    {
        "",
        ATOM_NS,
        "http://purl.org/atom/ns#",
        "http://purl.org/rss/1.0/",
        "http://my.netscape.com/rdf/simple/0.9/",
    }
)
_ROOTS = {
    "rss": "rss",
    f"{{{ATOM_NS}}}feed": "atom",
    "{http://purl.org/atom/ns#}feed": "atom",
    "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}RDF": "rss",
}
_LOCALITY_FIELDS = ("prompt", "target")


class UnsafeXmlError(ValueError):
    """The document declares entities; it is refused rather than expanded."""


class ExtensionError(ValueError):
    """One item's ``fe:fact_edit`` element is malformed; the message is the reason."""


def strict_tree(body: bytes, fallback_encoding: str | None = None) -> ET.Element:
    """Parse ``body`` as namespace-aware XML, refusing entity declarations.

    Raises ``xml.parsers.expat.ExpatError`` for malformed XML and :class:`UnsafeXmlError` for
    ``<!ENTITY`` declarations. Expat reads UTF-8, UTF-16 and single-byte encodings
    itself; for a multi-byte legacy one (Shift_JIS, GB2312, ...) it is decoded first
    with ``fallback_encoding`` (feedparser's guess).
    """
    try:
        return _parse(body, None)
    except ValueError as exc:
        if isinstance(exc, UnsafeXmlError) or not fallback_encoding:
            raise
        try:
            text = body.decode(fallback_encoding)
        except (LookupError, UnicodeDecodeError):
            raise exc from None
        return _parse(text.encode("utf-8"), "utf-8")


def _parse(data: bytes, encoding: str | None) -> ET.Element:
    builder = ET.TreeBuilder()
    parser = ParserCreate(encoding, namespace_separator="}")
    parser.SetParamEntityParsing(XML_PARAM_ENTITY_PARSING_NEVER)

    def refuse(name: str, *_: object) -> None:
        raise UnsafeXmlError(f"entity declarations are not allowed (found <!ENTITY {name} ...>)")

    def start(name: str, attrs: dict[str, str]) -> None:
        builder.start(_qname(name), {_qname(k): v for k, v in attrs.items()})

    parser.EntityDeclHandler = refuse
    parser.StartElementHandler = start
    parser.EndElementHandler = lambda name: builder.end(_qname(name))
    parser.CharacterDataHandler = builder.data
    parser.buffer_text = True
    parser.Parse(data, True)
    return builder.close()


def _qname(name: str) -> str:
    """Expat's ``uri}local`` to ElementTree's ``{uri}local``."""
    return "{" + name if "}" in name else name


def _split(tag: str) -> tuple[str, str]:
    if tag.startswith("{"):
        ns, _, local = tag[1:].partition("}")
        return ns, local
    return "", tag


def root_format(root: ET.Element) -> str | None:
    """``"atom"`` or ``"rss"`` (2.0, 0.9x or 1.0) from the root element, else None."""
    return _ROOTS.get(root.tag)


def feed_items(root: ET.Element) -> list[ET.Element]:
    """Every ``entry``/``item`` element of the feed vocabularies, in document order."""
    out = []
    for el in root.iter():
        ns, local = _split(el.tag)
        if local in ("entry", "item") and ns in _ITEM_NAMESPACES:
            out.append(el)
    return out


def item_key(item: ET.Element) -> str | None:
    """The id an item would get from feedparser: its id/guid, else its link."""
    ns, _ = _split(item.tag)
    prefix = f"{{{ns}}}" if ns else ""
    for tag in (f"{prefix}id", "guid", f"{prefix}link"):
        child = item.find(tag)
        if child is None:
            continue
        text = (child.text or "").strip() or child.get("href", "").strip()
        if text:
            return text
    return None


def read_fact_edit(item: ET.Element) -> dict[str, Any] | None:
    """The item's ``fe:fact_edit`` fields, None when it has none; :class:`ExtensionError` if bad."""
    found = item.findall(f"{{{FACT_EDIT_NS}}}fact_edit")
    if not found:
        return None
    if len(found) > 1:
        raise ExtensionError(f"{len(found)} fact_edit elements in one item (at most one)")
    element = found[0]
    children = list(element)
    text = (element.text or "").strip()
    if element.get("type") == "application/json" or (not children and text.startswith("{")):
        return _json_form(text, children)
    if text:
        raise ExtensionError("fact_edit holds text that is not a JSON object")
    fields: dict[str, Any] = {}
    for child in children:
        ns, name = _split(child.tag)
        if ns != FACT_EDIT_NS:
            continue  # other vocabularies may annotate the element; they are not ours
        if name == "rephrase":
            fields.setdefault("rephrases", []).append(_leaf(child, name).strip())
        elif name == "locality":
            fields.setdefault("locality", []).append(_locality(child))
        elif name in fields or name in ("rephrases",):
            raise ExtensionError(f"fact_edit field '{name}' given more than once or as a list")
        else:
            value = _leaf(child, name)
            fields[name] = value if name == "target" else value.strip()
    return fields


def _json_form(text: str, children: list[ET.Element]) -> dict[str, Any]:
    if children:
        raise ExtensionError("a JSON fact_edit must not also hold elements")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise ExtensionError(f"fact_edit JSON is not valid: {exc}") from None
    if not isinstance(value, dict):
        raise ExtensionError(f"fact_edit JSON must be an object, not {type(value).__name__}")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _leaf(element: ET.Element, name: str) -> str:
    if len(element):
        raise ExtensionError(f"fact_edit field '{name}' must hold text, not elements")
    return element.text or ""


def _locality(element: ET.Element) -> dict[str, str]:
    probe: dict[str, str] = {}
    for child in element:
        ns, name = _split(child.tag)
        if ns != FACT_EDIT_NS:
            continue
        if name not in _LOCALITY_FIELDS:
            raise ExtensionError(f"locality holds an unknown element '{name}'")
        if name in probe:
            raise ExtensionError(f"locality field '{name}' given more than once")
        value = _leaf(element=child, name=f"locality.{name}")
        probe[name] = value if name == "target" else value.strip()
    return probe
