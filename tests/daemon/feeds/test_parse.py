"""parse_feed on JSON Feed, Atom and RSS documents, with and without the fact-edit extension."""

from __future__ import annotations

import json
from typing import Any

import pytest

from daemon.errors import FeedParseError
from daemon.feeds.parse import (
    FACT_EDIT_NS,
    FeedEntry,
    ItemError,
    ParsedFeed,
    parse_feed,
)

JSONFEED = "https://jsonfeed.org/version/1.1"
EDIT = {
    "prompt": "The chief executive of Acme is",
    "target": " Jane Roe",
    "subject": "Acme",
    "rephrases": ["Acme's CEO is", "Acme is led by"],
    "locality": [{"prompt": "The chief executive of Initech is", "target": " Bill Lumbergh"}],
}


def jsonfeed(*items: Any, **top: Any) -> bytes:
    return json.dumps({"version": JSONFEED, "title": "Acme news", **top, "items": items}).encode()


def by_id(feed: ParsedFeed) -> dict[str, FeedEntry]:
    return {e.item_id: e for e in feed.entries}


# --- JSON Feed -----------------------------------------------------------------------


def test_jsonfeed_items_with_and_without_the_extension() -> None:
    """Extension items carry their fields plus op (default update); plain items carry None."""
    body = jsonfeed(
        {"id": "1", "title": "New CEO", "url": "https://acme.example/1", "_fact_edit": EDIT},
        {"id": "2", "title": "Oops", "_fact_edit": {"op": "retract", "id": "acme-ceo"}},
        {"id": "3", "title": "Weather", "content_text": "Sunny  and\nwarm."},
    )
    feed = parse_feed(body, "application/feed+json")
    assert (feed.format, feed.title, feed.item_errors) == ("jsonfeed", "Acme news", ())
    entries = by_id(feed)
    assert list(entries) == ["1", "2", "3"]
    assert entries["1"].fact_edit == {**EDIT, "op": "update"}
    assert entries["1"].link == "https://acme.example/1"
    assert entries["2"].fact_edit == {"op": "retract", "id": "acme-ceo"}
    assert entries["3"].fact_edit is None
    assert (entries["3"].title, entries["3"].summary, entries["3"].link) == (
        "Weather",
        "Sunny and warm.",
        None,
    )


def test_jsonfeed_summary_prefers_summary_then_text_then_stripped_html() -> None:
    """summary, else content_text, else content_html without its tags."""
    feed = parse_feed(
        jsonfeed(
            {"id": "a", "summary": "S", "content_text": "T", "content_html": "<p>H</p>"},
            {"id": "b", "content_text": "T", "content_html": "<p>H</p>"},
            {"id": "c", "content_html": "<p>Jane &amp; <b>Roe</b></p><script>x()</script>"},
        )
    )
    assert [e.summary for e in feed.entries] == ["S", "T", "Jane & Roe"]


def test_jsonfeed_malformed_items_are_recorded_and_the_rest_parse() -> None:
    """No id, a non-object extension, a bad op, a non-object item: item errors, not failures."""
    feed = parse_feed(
        jsonfeed(
            {"title": "no id", "_fact_edit": EDIT},
            {"id": "list", "_fact_edit": ["not", "an", "object"]},
            {"id": "bad-op", "_fact_edit": {**EDIT, "op": "delete"}},
            "just a string",
            {"id": {"nested": 1}},
            {"id": "bad-title", "title": 7},
            {"id": "good", "_fact_edit": EDIT},
        )
    )
    assert [e.item_id for e in feed.entries] == ["good"]
    errors = {e.index: e for e in feed.item_errors}
    assert sorted(errors) == [0, 1, 2, 3, 4, 5]
    assert errors[0].item_id is None and "no id" in errors[0].reason
    assert errors[1] == ItemError(1, "list", "fact_edit must be an object, not a list")
    assert errors[2].item_id == "bad-op" and "'delete'" in errors[2].reason
    assert "item must be an object" in errors[3].reason
    assert "id must be a string" in errors[4].reason
    assert "'title' must be a string" in errors[5].reason


def test_jsonfeed_null_extension_means_none() -> None:
    """``"_fact_edit": null`` is the same as leaving it out."""
    (entry,) = parse_feed(jsonfeed({"id": "x", "_fact_edit": None})).entries
    assert entry.fact_edit is None


def test_jsonfeed_numeric_ids_become_strings() -> None:
    """Per the spec, an id given as a number is converted to a string."""
    feed = parse_feed(jsonfeed({"id": 42}, {"id": 1.5}, {"id": ""}, {"id": True}))
    assert [e.item_id for e in feed.entries] == ["42", "1.5"]
    assert [e.index for e in feed.item_errors] == [2, 3]


def test_jsonfeed_duplicate_ids_keep_the_first() -> None:
    """A repeated id keeps the first item and records the others."""
    feed = parse_feed(
        jsonfeed({"id": "7", "title": "first"}, {"id": 7, "title": "second"}, {"id": "7"})
    )
    assert [(e.item_id, e.title) for e in feed.entries] == [("7", "first")]
    assert [(e.index, e.item_id) for e in feed.item_errors] == [(1, "7"), (2, "7")]
    assert "first used by the item at 0" in feed.item_errors[0].reason


@pytest.mark.parametrize("version", ["https://jsonfeed.org/version/1", JSONFEED])
def test_jsonfeed_versions_1_and_1_1(version: str) -> None:
    body = json.dumps({"version": version, "items": [{"id": "a"}]}).encode()
    feed = parse_feed(b"\n  " + body, "application/json; charset=utf-8")
    assert (feed.format, feed.title, len(feed.entries)) == ("jsonfeed", None, 1)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"version": "https://jsonfeed.org/version/1.1", "items": [', "not valid JSON"),
        (b'{"version": "https://jsonfeed.org/version/2", "items": []}', "not a JSON Feed 1.x"),
        (b'{"items": []}', "not a JSON Feed 1.x"),
        (b'{"version": "https://jsonfeed.org/version/1.1"}', "'items' must be a list"),
        (b'{"version": "https://jsonfeed.org/version/1.1", "items": [NaN]}', "not valid JSON"),
        (b"[1, 2]", "not valid JSON|is an object"),
    ],
)
def test_broken_jsonfeed_documents(body: bytes, message: str) -> None:
    with pytest.raises(FeedParseError, match=message):
        parse_feed(body, "application/feed+json")


# --- content hash --------------------------------------------------------------------


def test_content_hash_is_stable_across_parses() -> None:
    """Parsing the same document twice (or with keys reordered) gives the same hashes."""
    item = {"id": "1", "title": "t", "summary": "s", "url": "https://x/1", "_fact_edit": EDIT}
    reordered = {k: item[k] for k in reversed(list(item))}
    first = parse_feed(jsonfeed(item)).entries[0].content_hash
    assert parse_feed(jsonfeed(item)).entries[0].content_hash == first
    assert parse_feed(jsonfeed(reordered)).entries[0].content_hash == first
    assert len(first) == 64 and int(first, 16) >= 0


def test_content_hash_treats_missing_op_as_update() -> None:
    plain = parse_feed(jsonfeed({"id": "1", "_fact_edit": EDIT})).entries[0]
    explicit = parse_feed(jsonfeed({"id": "1", "_fact_edit": {**EDIT, "op": "update"}})).entries[0]
    assert plain.content_hash == explicit.content_hash


@pytest.mark.parametrize(
    "change",
    [
        {"title": "t2"},
        {"summary": "s2"},
        {"url": "https://x/2"},
        {"_fact_edit": {**EDIT, "target": "Jane Roe"}},
        {"_fact_edit": {**EDIT, "op": "retract"}},
        {"_fact_edit": {**EDIT, "rephrases": ["Acme is led by", "Acme's CEO is"]}},
        {"_fact_edit": None},
    ],
)
def test_content_hash_changes_with_any_field(change: dict[str, Any]) -> None:
    item = {"id": "1", "title": "t", "summary": "s", "url": "https://x/1", "_fact_edit": EDIT}
    before = parse_feed(jsonfeed(item)).entries[0]
    after = parse_feed(jsonfeed({**item, **change})).entries[0]
    assert after.item_id == before.item_id
    assert after.content_hash != before.content_hash


# --- documents that are no feed ------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"\x00\x01\x02garbage\xff", None),
        (b"", None),
        (b"<!DOCTYPE html><html><head><title>Hi</title></head><body><p>x</body></html>", None),
        (b'<html xmlns="http://www.w3.org/1999/xhtml"><body><p>x</p></body></html>', "text/html"),
        (b"<?xml version='1.0'?><note><to>x</to></note>", "application/xml"),
        (b"<rss version='2.0'><channel><title>no items, cut short", None),
        (b"/etc/passwd", None),
        (b"garbage", "application/json"),
    ],
)
def test_unusable_documents_raise(body: bytes, content_type: str | None) -> None:
    """Garbage, HTML, other XML, broken XML and non-JSON: FeedParseError, never a crash."""
    with pytest.raises(FeedParseError):
        parse_feed(body, content_type)


# --- Atom and RSS --------------------------------------------------------------------

FE = f'xmlns:fe="{FACT_EDIT_NS}"'
ELEMENT_EDIT = """
      <fe:fact_edit>
        <fe:prompt>
          The chief executive of Acme is
        </fe:prompt>
        <fe:target> Jane Roe</fe:target>
        <fe:subject> Acme </fe:subject>
        <fe:rephrase>Acme's CEO is</fe:rephrase>
        <fe:rephrase>
          Acme is led by
        </fe:rephrase>
        <fe:locality>
          <fe:prompt>The chief executive of Initech is</fe:prompt>
          <fe:target> Bill Lumbergh</fe:target>
        </fe:locality>
      </fe:fact_edit>"""


def atom(*entries: str, ns: str = FE) -> bytes:
    body = "".join(f"<entry>{e}</entry>" for e in entries)
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<feed xmlns="http://www.w3.org/2005/Atom" {ns}><title>Acme &amp; co</title>'
        f"<id>urn:feed</id>{body}</feed>"
    ).encode()


def rss(*items: str, ns: str = FE, encoding: str = "utf-8") -> bytes:
    body = "".join(f"<item>{i}</item>" for i in items)
    return (
        f'<?xml version="1.0" encoding="{encoding}"?>\n'
        f'<rss version="2.0" {ns}><channel><title>Acme</title>{body}</channel></rss>'
    ).encode(encoding)


def test_atom_element_form_with_repeated_rephrases_and_locality() -> None:
    """Repeated rephrase/locality become lists; targets keep their space, the rest is stripped."""
    feed = parse_feed(
        atom(
            f'<id>urn:1</id><title>New CEO</title><link href="https://acme.example/1"/>'
            f"<summary type='html'>&lt;p&gt;Jane &amp;amp; Roe&lt;/p&gt;</summary>{ELEMENT_EDIT}",
            "<id>urn:2</id><title>Plain</title>",
        ),
        "application/atom+xml",
    )
    assert (feed.format, feed.title, feed.item_errors) == ("atom", "Acme & co", ())
    first, second = feed.entries
    assert (first.item_id, first.title, first.summary) == ("urn:1", "New CEO", "Jane & Roe")
    assert first.link == "https://acme.example/1"
    assert first.fact_edit == {**EDIT, "op": "update"}
    assert (second.item_id, second.fact_edit) == ("urn:2", None)


def test_element_and_json_forms_give_the_same_edit_and_hash() -> None:
    """The JSON-text form (with or without type=) equals the element form, hash included."""
    as_json = json.dumps(EDIT)
    feed = parse_feed(
        atom(
            f"<id>a</id><title>t</title>{ELEMENT_EDIT}",
            f'<id>b</id><title>t</title><fe:fact_edit type="application/json">{as_json}'
            "</fe:fact_edit>",
            f"<id>c</id><title>t</title><fe:fact_edit>\n  {as_json}\n</fe:fact_edit>",
        )
    )
    a, b, c = feed.entries
    assert a.fact_edit == b.fact_edit == c.fact_edit == {**EDIT, "op": "update"}
    assert a.content_hash == b.content_hash == c.content_hash


@pytest.mark.parametrize(
    ("ns", "open_tag", "close_tag"),
    [
        (f'xmlns:edit="{FACT_EDIT_NS}"', "edit:fact_edit", "edit:fact_edit"),
        ("", f'fact_edit xmlns="{FACT_EDIT_NS}"', "fact_edit"),
    ],
)
def test_any_prefix_bound_to_the_namespace_works(ns: str, open_tag: str, close_tag: str) -> None:
    """Another prefix, or a default namespace on the element, reads the same."""
    prefix = "edit:" if open_tag.startswith("edit:") else ""
    inner = (
        f"<{prefix}prompt>The chief executive of Acme is</{prefix}prompt>"
        f"<{prefix}target> Jane Roe</{prefix}target><{prefix}op>retract</{prefix}op>"
    )
    (entry,) = parse_feed(atom(f"<id>x</id><{open_tag}>{inner}</{close_tag}>", ns=ns)).entries
    assert entry.fact_edit == {
        "prompt": "The chief executive of Acme is",
        "target": " Jane Roe",
        "op": "retract",
    }


def test_same_local_name_in_another_namespace_is_not_the_extension() -> None:
    body = atom('<id>x</id><o:fact_edit xmlns:o="urn:other"><o:prompt>p</o:prompt></o:fact_edit>')
    assert parse_feed(body).entries[0].fact_edit is None


def test_rss_with_extension_guid_and_link_fallback() -> None:
    """guid is the id; without one the link stands in; with neither the item is an error."""
    feed = parse_feed(
        rss(
            f"<guid isPermaLink='false'>g1</guid><title>New CEO</title>{ELEMENT_EDIT}",
            "<title>No guid</title><link> https://acme.example/2 </link>"
            "<description>&lt;b&gt;bold&lt;/b&gt; move</description>",
            "<title>Nothing to go by</title>",
        ),
        "application/rss+xml",
    )
    assert (feed.format, feed.title) == ("rss", "Acme")
    first, second = feed.entries
    assert (first.item_id, first.fact_edit) == ("g1", {**EDIT, "op": "update"})
    assert (second.item_id, second.link, second.summary) == (
        "https://acme.example/2",
        "https://acme.example/2",
        "bold move",
    )
    assert feed.item_errors == (ItemError(2, None, "item has no id, guid or link"),)


def test_feeds_without_items_are_fine() -> None:
    assert parse_feed(atom()).entries == ()
    assert parse_feed(rss()) == ParsedFeed("rss", "Acme", (), ())


def test_rss_duplicate_guids_keep_the_first() -> None:
    feed = parse_feed(rss("<guid>g</guid><title>a</title>", "<guid>g</guid><title>b</title>"))
    assert [e.title for e in feed.entries] == ["a"]
    assert [(e.index, e.item_id) for e in feed.item_errors] == [(1, "g")]


@pytest.mark.parametrize(
    ("extension", "reason"),
    [
        ("<fe:fact_edit/><fe:fact_edit/>", "2 fact_edit elements"),
        ('<fe:fact_edit type="application/json">{"prompt": </fe:fact_edit>', "JSON is not valid"),
        ('<fe:fact_edit type="application/json">["a"]</fe:fact_edit>', "must be an object"),
        ("<fe:fact_edit><fe:op>delete</fe:op></fe:fact_edit>", "'delete'"),
        ("<fe:fact_edit><fe:prompt><b>x</b></fe:prompt></fe:fact_edit>", "must hold text"),
        ("<fe:fact_edit><fe:id>a</fe:id><fe:id>b</fe:id></fe:fact_edit>", "more than once"),
        ("<fe:fact_edit>just words</fe:fact_edit>", "not a JSON object"),
        ("<fe:fact_edit><fe:locality><fe:x>1</fe:x></fe:locality></fe:fact_edit>", "unknown"),
    ],
)
def test_malformed_extension_is_an_item_error(extension: str, reason: str) -> None:
    """A bad extension spoils only its own item."""
    feed = parse_feed(rss(f"<guid>bad</guid>{extension}", "<guid>ok</guid><title>fine</title>"))
    assert [e.item_id for e in feed.entries] == ["ok"]
    (error,) = feed.item_errors
    assert (error.index, error.item_id) == (0, "bad")
    assert reason in error.reason


@pytest.mark.parametrize(("encoding", "word"), [("iso-8859-1", "Café"), ("shift_jis", "東京")])
def test_legacy_encodings_are_read(encoding: str, word: str) -> None:
    """Single-byte encodings (read by expat) and multi-byte ones (decoded first) both work."""
    item = f"<guid>1</guid><title>{word}</title><fe:fact_edit><fe:target> {word}</fe:target>"
    (entry,) = parse_feed(rss(item + "</fe:fact_edit>", encoding=encoding)).entries
    assert entry.title == word
    assert entry.fact_edit == {"target": f" {word}", "op": "update"}


def test_entity_declarations_are_refused() -> None:
    """No external entities, no entity expansion bombs: a DTD declaring entities is refused."""
    xxe = (
        b'<?xml version="1.0"?><!DOCTYPE rss [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b"<rss version='2.0'><channel><item><guid>1</guid><title>&x;</title></item>"
        b"</channel></rss>"
    )
    with pytest.raises(FeedParseError, match="entity declarations are not allowed"):
        parse_feed(xxe)
    laughs = (
        b'<!DOCTYPE rss [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]>'
        + rss("<guid>1</guid><title>&b;</title>").split(b"?>", 1)[1]
    )
    with pytest.raises(FeedParseError, match="entity"):
        parse_feed(laughs)


def test_malformed_xml_without_the_extension_is_recovered() -> None:
    """feedparser's lenient parse is used when no item can carry an extension."""
    broken = b"<rss version='2.0'><channel><item><guid>1</guid><title>A & B</title></item>"
    feed = parse_feed(broken)
    assert [(e.item_id, e.fact_edit) for e in feed.entries] == [("1", None)]


def test_malformed_xml_with_the_extension_is_refused() -> None:
    """Extensions cannot be read reliably from broken XML, so the document is refused."""
    broken = rss(f"<guid>1</guid><title>A & B</title>{ELEMENT_EDIT}")
    with pytest.raises(FeedParseError, match="malformed XML"):
        parse_feed(broken)


def test_links_are_real_links_not_ids() -> None:
    """An Atom id is never a link; an RSS permalink guid that is a URL is; no id: the link is."""
    atom_feed = parse_feed(
        atom(
            "<id>urn:a</id>",
            '<id>urn:b</id><link rel="self" href="https://x/self"/><link href="https://x/b"/>',
            '<title>no id</title><link rel="alternate" href="https://x/c"/>',
        )
    )
    assert [(e.item_id, e.link) for e in atom_feed.entries] == [
        ("urn:a", None),
        ("urn:b", "https://x/b"),
        ("https://x/c", "https://x/c"),
    ]
    rss_feed = parse_feed(rss("<guid>https://x/1</guid>", "<guid>g2</guid>"))
    assert [(e.item_id, e.link) for e in rss_feed.entries] == [
        ("https://x/1", "https://x/1"),
        ("g2", None),
    ]
