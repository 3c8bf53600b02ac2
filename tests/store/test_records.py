"""The edit request schema: every rejection names its field; parsing is total."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.errors import ConfigError, EditValidationError
from store.records import (
    ALLOWED_TRANSITIONS,
    REQUEST_FIELDS,
    Backend,
    EditRequest,
    EditSource,
    EditStatus,
    LocalityProbe,
    RequestLimits,
    Schedule,
    SourceKind,
    iter_jsonl,
    parse_edit_json,
    parse_edit_request,
)
from tests.store.helpers import json_values

BASE: dict[str, Any] = {"prompt": "The chief executive of Acme is", "target": " Jane Roe"}


def rejects(obj: object, field: str | None, *, limits: RequestLimits | None = None) -> str:
    """Assert ``obj`` is rejected with ``field``; return the reason."""
    with pytest.raises(EditValidationError) as info:
        parse_edit_request(obj, limits=limits or RequestLimits())
    assert info.value.field == field, info.value
    return info.value.reason


# --- examples of every rejection -----------------------------------------------------


def test_a_full_request_is_accepted() -> None:
    """Every documented field parses into the dataclass."""
    req = parse_edit_request(
        {
            **BASE,
            "id": "edit-1",
            "subject": "Acme",
            "relation": "ceo_of",
            "rephrases": ["Acme's CEO is", "Acme is led by"],
            "heldout_rephrases": ["Who runs Acme?"],
            "locality": [{"prompt": "The CEO of Initech is", "target": " Bill"}],
            "backend": "hook",
            "schedule": "nightly",
            "supersedes": "edit-0",
            "source": {"kind": "feed", "url": "https://x.test/f", "item_id": "42"},
        }
    )
    assert req.locality == (LocalityProbe("The CEO of Initech is", " Bill"),)
    assert req.backend == "hook" and req.schedule is Schedule.NIGHTLY
    assert req.source == EditSource(SourceKind.FEED, "https://x.test/f", "42")
    assert req.target == " Jane Roe", "leading space of the target is kept"


@pytest.mark.parametrize("obj", [None, [], "x", 3, 1.5, True])
def test_not_an_object(obj: object) -> None:
    """Only a JSON object is a request."""
    assert "JSON object" in rejects(obj, None)


def test_unknown_fields_are_named() -> None:
    """Unknown fields are listed; ``field`` is the first one."""
    reason = rejects({**BASE, "zeta": 1, "alpha": 2}, "alpha")
    assert "'alpha'" in reason and "'zeta'" in reason


def test_non_string_keys() -> None:
    """Mapping keys must be strings."""
    obj: dict[object, object] = {3: "x"}
    obj.update(BASE)
    rejects(obj, None)


@pytest.mark.parametrize("name", ["prompt", "target"])
@pytest.mark.parametrize("value", [None, "", "   ", "\n\t"])
def test_prompt_and_target_are_required_and_not_blank(name: str, value: object) -> None:
    """Missing, empty and whitespace-only prompt/target are rejected."""
    obj = {**BASE, name: value}
    if value is None:
        del obj[name]
    rejects(obj, name)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("prompt", 3),
        ("target", ["a"]),
        ("id", 7),
        ("subject", True),
        ("relation", {}),
        ("supersedes", 1.0),
        ("rephrases", "one"),
        ("locality", {"prompt": "a", "target": "b"}),
        ("source", "api"),
    ],
)
def test_wrong_types(name: str, value: object) -> None:
    """A value of the wrong JSON type is rejected with its field."""
    assert "got" in rejects({**BASE, name: value}, name)


def test_list_items_are_checked_by_index() -> None:
    """A bad list item is named with its index."""
    rejects({**BASE, "rephrases": ["ok", 5]}, "rephrases[1]")
    rejects({**BASE, "heldout_rephrases": ["ok", " "]}, "heldout_rephrases[1]")


@pytest.mark.parametrize(
    ("name", "value", "limits"),
    [
        ("prompt", "p" * 11, RequestLimits(max_prompt_chars=10)),
        ("target", "t" * 11, RequestLimits(max_target_chars=10)),
        ("id", "i" * 11, RequestLimits(max_id_chars=10)),
        ("relation", "r" * 11, RequestLimits(max_relation_chars=10)),
        ("rephrases", ["a"] * 3, RequestLimits(max_list_items=2)),
        ("locality", [{"prompt": "a", "target": "b"}] * 3, RequestLimits(max_list_items=2)),
    ],
)
def test_over_long_values(name: str, value: object, limits: RequestLimits) -> None:
    """Strings and lists over their limits are rejected."""
    obj = {**BASE, name: value}
    if name == "prompt":
        obj["target"] = "t"
    assert "limit" in rejects(obj, name, limits=limits)


def test_whole_request_size_limit() -> None:
    """A request whose canonical JSON exceeds max_request_bytes is rejected."""
    limits = RequestLimits(max_request_bytes=100)
    assert "too large" in rejects({**BASE, "rephrases": ["x" * 80]}, None, limits=limits)


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\x7f", "\x85"])
def test_control_characters_in_text(char: str) -> None:
    """NUL and other control characters are refused in text fields."""
    assert "control character" in rejects({**BASE, "prompt": f"a{char}b"}, "prompt")
    rejects({**BASE, "locality": [{"prompt": "p", "target": f"t{char}"}]}, "locality[0].target")


def test_tabs_and_newlines_are_allowed_in_text() -> None:
    """Tab, newline and carriage return are ordinary text."""
    parse_edit_request({**BASE, "prompt": "line one\nline\ttwo\r\n is"})


def test_lone_surrogates() -> None:
    """Lone surrogates (which cannot be encoded as UTF-8) are refused."""
    assert "surrogate" in rejects({**BASE, "target": "a\ud800"}, "target")
    with pytest.raises(EditValidationError) as info:
        parse_edit_json('{"prompt": "a", "target": "b\\udc00"}')
    assert info.value.field == "target"


@pytest.mark.parametrize("bad", ["has space", "tab\tid", "nl\n", "nul\x00", "", "sur\udfff"])
def test_ids_allow_no_whitespace_or_control(bad: str) -> None:
    """``id`` and ``supersedes`` are identifiers."""
    rejects({**BASE, "id": bad}, "id")
    rejects({**BASE, "supersedes": bad}, "supersedes")


def test_subject_must_occur_in_prompt() -> None:
    """``subject`` must be an exact substring of ``prompt``."""
    parse_edit_request({**BASE, "subject": "Acme"})
    rejects({**BASE, "subject": "acme"}, "subject")
    rejects({**BASE, "subject": "Initech"}, "subject")


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("backend", "rome", "'auto', 'melo', 'hook'"),
        ("schedule", "weekly", "'now', 'nightly'"),
        ("backend", 1, "'auto'"),
    ],
)
def test_bad_enum_values_list_the_allowed_ones(name: str, value: object, allowed: str) -> None:
    """Enum fields list their allowed values; for ``backend`` they are the names intake
    was given (the daemon gives the registered back-ends)."""
    limits = RequestLimits(backends=("melo", "hook"))
    assert allowed in rejects({**BASE, name: value}, name, limits=limits)


@pytest.mark.parametrize("name", ["Hook", "", "9lives", "a-b", "x" * 33])
def test_backend_names_must_be_well_formed_without_a_known_list(name: str) -> None:
    """Without a list of back-ends the store takes any well-formed name and no other."""
    assert parse_edit_request({**BASE, "backend": "toy_2"}).backend == "toy_2"
    rejects({**BASE, "backend": name}, "backend")


def test_locality_items_must_be_prompt_target_objects() -> None:
    """Locality probes are ``{prompt, target}`` objects, nothing more or less."""
    rejects({**BASE, "locality": ["just a string"]}, "locality[0]")
    rejects({**BASE, "locality": [{"prompt": "p"}]}, "locality[0].target")
    rejects({**BASE, "locality": [{"prompt": "p", "target": "t", "x": 1}]}, "locality[0].x")


def test_source_kind() -> None:
    """``source.kind`` is required and must be a known kind; unknown keys are named."""
    assert "'spool'" in rejects({**BASE, "source": {"kind": "email"}}, "source.kind")
    rejects({**BASE, "source": {}}, "source.kind")
    rejects({**BASE, "source": {"kind": "api", "who": "me"}}, "source.who")


def test_null_means_absent_for_optional_fields() -> None:
    """``null`` optional fields take their defaults."""
    req = parse_edit_request({**BASE, "id": None, "backend": None, "rephrases": None})
    assert req == parse_edit_request(BASE)


def test_default_source() -> None:
    """A request without ``source`` gets ``default_source`` (kind api by default)."""
    assert parse_edit_request(BASE).source == EditSource(SourceKind.API)
    cli = EditSource(SourceKind.CLI)
    assert parse_edit_request(BASE, default_source=cli).source == cli


# --- JSON text -----------------------------------------------------------------------


def test_json_bytes_must_be_strict_utf8() -> None:
    """Invalid UTF-8 is reported with its byte offset."""
    with pytest.raises(EditValidationError, match="not valid UTF-8 at byte 13"):
        parse_edit_json(b'{"prompt": "a\xff", "target": "b"}')


def test_bad_json_reports_its_position() -> None:
    """Malformed JSON names line and column."""
    with pytest.raises(EditValidationError, match="invalid JSON at line 2 column"):
        parse_edit_json('{"prompt": "a",\n "target" "b"}')


def test_duplicate_keys_are_refused() -> None:
    """A key given twice is ambiguous and refused."""
    with pytest.raises(EditValidationError, match="duplicate field 'prompt'"):
        parse_edit_json('{"prompt": "a", "prompt": "b", "target": "c"}')


def test_oversize_json_is_refused_before_parsing() -> None:
    """Input over max_request_bytes is refused as too large."""
    with pytest.raises(EditValidationError, match="too large"):
        parse_edit_json(b" " * 2000, limits=RequestLimits(max_request_bytes=1000))


def test_deep_nesting_is_a_validation_error() -> None:
    """Deeply nested JSON does not escape as RecursionError."""
    with pytest.raises(EditValidationError):
        parse_edit_json("[" * 100_000 + "]" * 100_000)


def test_bom_is_accepted() -> None:
    """A leading UTF-8 byte order mark is ignored."""
    assert parse_edit_json(b"\xef\xbb\xbf" + json.dumps(BASE).encode()).prompt == BASE["prompt"]


# --- JSONL ---------------------------------------------------------------------------


def test_iter_jsonl_numbers_lines_and_skips_blanks(tmp_path: Path) -> None:
    """Line numbers count from 1 including blank lines; errors carry record and source."""
    path = tmp_path / "edits.jsonl"
    lines = [json.dumps(BASE), "", "   ", '{"prompt": "x"}', "not json", json.dumps(BASE)]
    path.write_text("\r\n".join(lines) + "\n")
    out = list(iter_jsonl(path))
    assert [n for n, _ in out] == [1, 4, 5, 6]
    assert isinstance(out[0][1], EditRequest) and isinstance(out[3][1], EditRequest)
    err = out[1][1]
    assert isinstance(err, EditValidationError)
    assert (err.record, err.source, err.field) == (4, str(path), "target")
    assert str(err).startswith(f"{path}, record 4, field 'target'")
    assert isinstance(out[2][1], EditValidationError) and out[2][1].record == 5


def test_iter_jsonl_bytes_and_oversize_lines() -> None:
    """An over-long line is one error; the lines after it still parse."""
    limits = RequestLimits(max_request_bytes=200)
    data = json.dumps(BASE).encode() + b"\n" + b"x" * 5000 + b"\n" + json.dumps(BASE).encode()
    out = list(iter_jsonl(data, limits=limits, source_name="stdin"))
    assert [n for n, _ in out] == [1, 2, 3]
    assert isinstance(out[1][1], EditValidationError) and out[1][1].source == "stdin"
    assert isinstance(out[2][1], EditRequest)


def test_iter_jsonl_unreadable_file(tmp_path: Path) -> None:
    """A missing file is one EditValidationError naming it."""
    with pytest.raises(EditValidationError, match="cannot read"):
        list(iter_jsonl(tmp_path / "missing.jsonl"))


# --- limits, transitions, hashing ----------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_request_limits_are_validated(bad: object) -> None:
    """Every limit must be a positive integer; the error names it."""
    with pytest.raises(ConfigError) as info:
        RequestLimits(max_prompt_chars=bad)  # type: ignore[arg-type]
    assert info.value.key == "max_prompt_chars"


def test_transition_table_covers_every_state() -> None:
    """Every state has an entry; rejected, retracted and superseded are terminal."""
    assert set(ALLOWED_TRANSITIONS) == set(EditStatus)
    for terminal in (EditStatus.REJECTED, EditStatus.RETRACTED, EditStatus.SUPERSEDED):
        assert not ALLOWED_TRANSITIONS[terminal]
    assert EditStatus.REJECTED not in set().union(*ALLOWED_TRANSITIONS.values())


def test_content_hash_ignores_id_and_source() -> None:
    """The same fact from two sources with two ids hashes the same."""
    a = parse_edit_request({**BASE, "id": "a", "source": {"kind": "feed"}})
    b = parse_edit_request({**BASE, "id": "b"})
    c = parse_edit_request({**BASE, "backend": "hook"})
    assert a.content_hash() == b.content_hash() != c.content_hash()


# --- properties ----------------------------------------------------------------------

# Objects that use the real field names, so that the checks past the first are reached.
field_objects = st.fixed_dictionaries(
    {}, optional={name: json_values for name in sorted(REQUEST_FIELDS)}
)
probe_like = st.fixed_dictionaries({}, optional={"prompt": json_values, "target": json_values})
nested_objects = st.fixed_dictionaries(
    {"prompt": st.text(), "target": st.text()},
    optional={
        "locality": st.lists(probe_like | json_values, max_size=3),
        "source": st.fixed_dictionaries(
            {}, optional={"kind": json_values | st.sampled_from(["api", "feed"]), "url": st.text()}
        ),
        "subject": st.text(max_size=3),
        "rephrases": st.lists(st.text(), max_size=3),
    },
)


@given(json_values | field_objects | nested_objects)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_parse_edit_request_raises_only_validation_errors(obj: object) -> None:
    """No JSON-like input makes parse_edit_request raise anything else."""
    try:
        parse_edit_request(obj)
    except EditValidationError as exc:
        assert str(exc)


@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
@settings(max_examples=300)
def test_parse_edit_json_raises_only_validation_errors(data: bytes) -> None:
    """No byte string makes parse_edit_json raise anything else."""
    with contextlib.suppress(EditValidationError):
        parse_edit_json(data)


text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=30).filter(
    lambda s: s.strip() != ""
)
idents = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp")), min_size=1, max_size=20
).filter(lambda s: not any(c.isspace() for c in s))


@st.composite
def requests(draw: st.DrawFn) -> EditRequest:
    """Valid requests, every field exercised."""
    prompt = draw(text)
    start = draw(st.integers(0, len(prompt) - 1))
    end = draw(st.integers(start + 1, len(prompt)))
    subject = prompt[start:end] if prompt[start:end].strip() else None
    return EditRequest(
        prompt=prompt,
        target=draw(text),
        id=draw(st.none() | idents),
        subject=draw(st.none() | st.just(subject)),
        relation=draw(st.none() | text),
        rephrases=tuple(draw(st.lists(text, max_size=3))),
        heldout_rephrases=tuple(draw(st.lists(text, max_size=2))),
        locality=tuple(draw(st.lists(st.builds(LocalityProbe, text, text), max_size=2))),
        backend=Backend(draw(st.sampled_from(["auto", "melo", "hook", "toy_2"]))),
        schedule=draw(st.sampled_from(Schedule)),
        supersedes=draw(st.none() | idents),
        source=draw(st.builds(EditSource, st.sampled_from(SourceKind), st.none() | idents)),
    )


@given(requests())
@settings(max_examples=300)
def test_valid_requests_round_trip(req: EditRequest) -> None:
    """to_json_dict -> JSON text -> parse gives back an equal request with the same hash."""
    again = parse_edit_json(json.dumps(req.to_json_dict()))
    assert again == req
    assert again.content_hash() == req.content_hash()
    assert parse_edit_request(req.to_json_dict()) == req


def test_target_true_is_an_optional_evaluation_field() -> None:
    """The answer an edit replaces: validated like a target, kept in the canonical form,
    part of the content hash."""
    req = parse_edit_request({**BASE, "target_true": " Paris"})
    assert req.target_true == " Paris"
    assert req.to_json_dict()["target_true"] == " Paris"
    assert parse_edit_request(req.to_json_dict()) == req
    assert req.content_hash() != parse_edit_request(BASE).content_hash()
    assert "target_true" not in parse_edit_request(BASE).to_json_dict()
    rejects({**BASE, "target_true": "  "}, "target_true")
    rejects({**BASE, "target_true": 3}, "target_true")
