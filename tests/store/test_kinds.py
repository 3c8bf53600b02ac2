"""Request kinds (fact, forget, behaviour) at intake, in the store and in listings."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from daemon.errors import ConfigError, EditValidationError
from store.db import Store
from store.queue import EditQueue
from store.records import EditKind, RequestLimits, Scope, parse_edit_request
from store.schema import SourceKind

FORGET: dict[str, Any] = {
    "kind": "forget",
    "prompt": "Jane Roe lives at",
    "subject": "Jane Roe",
}


def _field_of(obj: dict[str, Any]) -> str | None:
    with pytest.raises(EditValidationError) as info:
        parse_edit_request(obj)
    return info.value.field


def test_fact_is_the_default_kind_and_is_not_written_out() -> None:
    request = parse_edit_request({"prompt": "The CEO of Acme is", "target": " Jane"})
    assert request.kind is EditKind.FACT and request.scope is Scope.PROMPT
    assert "kind" not in request.to_json_dict() and "scope" not in request.to_json_dict()


def test_a_forget_without_target_gets_the_configured_withheld_answer() -> None:
    request = parse_edit_request(FORGET, limits=RequestLimits(withheld_answer=" [redacted]"))
    assert request.kind is EditKind.FORGET
    assert request.target == " [redacted]"
    assert parse_edit_request(FORGET).target == " [withheld]"
    again = parse_edit_request(request.to_json_dict())
    assert again == request  # the stored form round-trips


def test_a_forget_keeps_a_target_it_names() -> None:
    request = parse_edit_request({**FORGET, "target": " a private person", "scope": "subject"})
    assert request.target == " a private person" and request.scope is Scope.SUBJECT
    assert request.to_json_dict()["scope"] == "subject"


def test_a_forget_needs_a_subject() -> None:
    assert _field_of({"kind": "forget", "prompt": "Jane Roe lives at"}) == "subject"


@pytest.mark.parametrize("kind", ["fact", "behaviour"])
def test_subject_scope_is_only_for_forget(kind: str) -> None:
    obj = {"kind": kind, "prompt": "Who are you?", "target": " editd", "scope": "subject"}
    assert _field_of(obj) == "scope"


@pytest.mark.parametrize("kind", ["fact", "behaviour"])
def test_facts_and_behaviours_need_a_target(kind: str) -> None:
    assert _field_of({"kind": kind, "prompt": "Who are you?"}) == "target"


@pytest.mark.parametrize(("name", "value"), [("kind", "erase"), ("kind", 3), ("scope", "all")])
def test_unknown_kinds_and_scopes_list_the_allowed_ones(name: str, value: object) -> None:
    with pytest.raises(EditValidationError) as info:
        parse_edit_request({**FORGET, name: value})
    assert info.value.field == name and "must be one of" in info.value.reason


def test_a_behaviour_needs_no_subject_and_hashes_apart_from_a_fact() -> None:
    behaviour = parse_edit_request(
        {"kind": "behaviour", "prompt": "Who are you?", "target": " I am Ada."}
    )
    fact = parse_edit_request({"prompt": "Who are you?", "target": " I am Ada."})
    assert behaviour.subject is None
    assert behaviour.content_hash() != fact.content_hash()


def test_a_blank_withheld_answer_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        RequestLimits(withheld_answer="  ")


def test_the_store_keeps_and_filters_by_kind(store: Store, store_path: Path) -> None:
    queue = EditQueue(store)
    results = queue.submit_many(
        [
            {"id": "f1", "prompt": "The CEO of Acme is", "target": " Jane"},
            {**FORGET, "id": "g1"},
            {"id": "b1", "kind": "behaviour", "prompt": "Who are you?", "target": " Ada"},
            {**FORGET, "id": "g2", "prompt": "Jane Roe was born in"},
            {"id": "bad", "kind": "forget", "prompt": "no subject here"},
        ],
        source_kind=SourceKind.API,
    )
    forgets = queue.list(kind=EditKind.FORGET)
    assert [r.id for r in forgets] == ["g1", "g2"]
    assert all(r.kind is EditKind.FORGET for r in forgets)
    assert forgets[0].to_json_dict()["kind"] == "forget"
    assert [r.id for r in queue.list(kind=EditKind.BEHAVIOUR)] == ["b1"]
    assert [r.id for r in queue.list(kind=EditKind.FORGET, limit=1, after="g1")] == ["g2"]
    assert results[-1].status == "rejected"  # stored with its reason, never dropped
    assert "required for kind 'forget'" in (queue.get(results[-1].id).error or "")
    conn = sqlite3.connect(store_path)
    try:
        rows = dict(conn.execute("SELECT id, kind FROM edits").fetchall())
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("UPDATE edits SET kind = 'nonsense' WHERE id = 'f1'")
    finally:
        conn.close()
    assert rows["f1"] == "fact" and rows["g1"] == "forget" and rows["b1"] == "behaviour"
    (raw,) = (
        sqlite3.connect(store_path)
        .execute("SELECT request_json FROM edits WHERE id = 'g1'")
        .fetchone()
    )
    stored = json.loads(raw)
    assert stored["target"] == " [withheld]" and stored["kind"] == "forget"
