"""Hypothesis throws odd input at every route: never a 500, always the JSON error shape.

Afterwards the store is sound (``integrity_check``) and every stored row decodes.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from store.schema import EditStatus
from tests.daemon.api.conftest import (
    MODEL_NAME,
    TOKEN,
    ClientFactory,
    StoreFacade,
    assert_error,
)

FUZZ = settings(
    max_examples=35,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
LIMITS: dict[str, Any] = {
    "max_request_bytes": 4096,
    "max_edits_per_request": 4,
    "max_prompts_per_completion": 3,
    "max_tokens_limit": 3,
}

surrogates = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
texts = st.one_of(st.text(max_size=20), surrogates, st.sampled_from(["", " ", "\x00", "é"]))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
EDIT_KEYS = ["id", "prompt", "target", "subject", "relation", "rephrases", "locality"]
EDIT_KEYS += ["backend", "schedule", "supersedes", "source", "heldout_rephrases"]
edit_like = st.fixed_dictionaries(
    {},
    optional={
        key: st.one_of(json_values, st.sampled_from(["The CEO of Acme is", " Jane", "melo"]))
        for key in EDIT_KEYS
    },
)
edits_bodies = st.fixed_dictionaries(
    {"edits": st.lists(st.one_of(edit_like, edit_like, json_values), max_size=5)}
)
raw_bytes = st.binary(max_size=300)
content_types = st.sampled_from(
    [None, "application/json", "application/json; charset=utf-8", "text/plain", "x/y+json"]
)


def body_bytes(value: Any, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def send(client: TestClient, method: str, url: str, content: bytes, ctype: str | None) -> Any:
    headers = {} if ctype is None else {"content-type": ctype}
    return client.request(method, url, content=content, headers=headers)


def check(response: Any) -> None:
    """Never a server error; every error is the JSON error shape."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = assert_error(response, response.status_code)
        field = error.get("field", error.get("param"))
        event(f"status {response.status_code} ({field}) {error['message'][:60]}")
    else:
        event(f"status {response.status_code}")
        if response.headers["content-type"].startswith("application/json"):
            response.json()


def check_store(facade: StoreFacade) -> None:
    assert facade.store.integrity_check() == "ok"
    for status in [None, *EditStatus]:
        records = facade.queue.list(status, limit=10_000)
        for record in records:
            json.dumps(record.to_json_dict(), ensure_ascii=True, allow_nan=False)


@FUZZ
@given(
    body=st.one_of(
        *[edits_bodies] * 4,
        st.dictionaries(texts, json_values, max_size=3),
        json_values,
        raw_bytes,
    ),
    ascii_only=st.booleans(),
    ctype=st.one_of(st.just("application/json"), content_types),
)
def test_fuzz_submit_edits(
    make_client: ClientFactory, facade: StoreFacade, body: Any, ascii_only: bool, ctype: str | None
) -> None:
    client = make_client(**LIMITS)
    content = body if isinstance(body, bytes) else body_bytes(body, ascii_only)
    response = send(client, "POST", "/v1/edits", content, ctype)
    check(response)
    if response.status_code == 202:
        ids = response.json()["ids"]
        assert len(ids) == len(body["edits"])
        for edit_id in ids:
            check(client.get(f"/v1/edits/{urllib.parse.quote(edit_id, safe='')}"))
    check_store(facade)


@FUZZ
@given(
    params=st.dictionaries(
        st.sampled_from(["status", "limit", "after", "other"]) | st.text(max_size=5),
        st.text(max_size=12) | st.integers().map(str),
        max_size=4,
    ),
    raw_query=st.text(max_size=30),
)
def test_fuzz_list_edits(
    make_client: ClientFactory, facade: StoreFacade, params: dict[str, str], raw_query: str
) -> None:
    client = make_client(**LIMITS)
    facade.queue.submit_many([{"prompt": "The CEO of Acme is", "target": " Jane"}, {"x": 1}])
    check(client.get("/v1/edits", params=params))
    check(client.get("/v1/edits?" + urllib.parse.quote(raw_query, safe="=&%")))
    check_store(facade)


@FUZZ
@given(
    edit_id=st.one_of(st.text(min_size=1, max_size=40), st.sampled_from(["existing", "..", "%"])),
    reason=st.none() | st.text(max_size=20),
    authorization=st.none()
    | st.text(st.characters(codec="ascii", exclude_categories=["Cc"])).filter(
        lambda header: TOKEN not in header
    )
    | st.just(f"Bearer {TOKEN}"),
)
def test_fuzz_delete_and_get_edit(
    make_client: ClientFactory,
    facade: StoreFacade,
    edit_id: str,
    reason: str | None,
    authorization: str | None,
) -> None:
    client = make_client(token=TOKEN, **LIMITS)
    facade.queue.submit({"id": "existing", "prompt": "The CEO of Acme is", "target": " Jane"})
    path = f"/v1/edits/{urllib.parse.quote(edit_id, safe='')}"
    headers = {} if authorization is None else {"Authorization": authorization}
    params = {} if reason is None else {"reason": reason}
    response = client.delete(path, params=params, headers=headers)
    check(response)
    if authorization != f"Bearer {TOKEN}":
        assert response.status_code == 401
    check(client.delete(path, params=params, headers={"Authorization": f"Bearer {TOKEN}"}))
    check(client.get(path))
    check_store(facade)


def mostly(good: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly ``good``; sometimes ``odd`` or any JSON value."""
    return st.one_of(*[good] * 8, odd, json_values)


plain = st.text(max_size=20)
completion_fields = {
    "prompt": mostly(
        st.one_of(plain, st.lists(plain, min_size=1, max_size=3), st.just("Shus Fismou is")),
        st.one_of(texts, st.lists(texts, max_size=5)),
    ),
    "max_tokens": mostly(st.integers(0, 3), st.integers(-2, 6)),
    "temperature": mostly(st.one_of(st.floats(0, 2), st.just(0)), st.floats(-1, 3)),
    "top_p": mostly(st.floats(0.01, 1), st.floats(-0.2, 1.2)),
    "logprobs": mostly(st.one_of(st.integers(0, 5), st.none()), st.integers(-1, 7)),
    "stop": mostly(st.one_of(plain, st.lists(plain, max_size=4), st.none()), st.lists(texts)),
    "seed": mostly(st.one_of(st.integers(0, 2**63 - 1), st.none()), st.integers(-5, 2**64)),
    "model": mostly(st.sampled_from([MODEL_NAME, None]), st.text(max_size=10)),
    "n": st.sampled_from([1] * 8 + [2, "1"]),
    "echo": st.sampled_from([False] * 8 + [True]),
}
completion_bodies = st.fixed_dictionaries(
    {"prompt": completion_fields["prompt"]},
    optional={k: v for k, v in completion_fields.items() if k != "prompt"},
)


@settings(FUZZ, max_examples=50)
@given(
    body=st.one_of(
        completion_bodies,
        completion_bodies,
        st.dictionaries(texts, json_values, max_size=3),
        json_values,
        raw_bytes,
    ),
    ascii_only=st.booleans(),
    ctype=st.one_of(st.just("application/json"), content_types),
)
def test_fuzz_completions(
    make_client: ClientFactory, facade: StoreFacade, body: Any, ascii_only: bool, ctype: str | None
) -> None:
    client = make_client(**LIMITS)
    content = body if isinstance(body, bytes) else body_bytes(body, ascii_only)
    response = send(client, "POST", "/v1/completions", content, ctype)
    check(response)
    if response.status_code == 200:
        choices = response.json()["choices"]
        assert [c["index"] for c in choices] == list(range(len(choices)))
        for choice in choices:
            logprobs = choice["logprobs"]
            if logprobs is not None:
                assert all(lp <= 0 for lp in logprobs["token_logprobs"])


message_like = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant", "tool", 3]),
        "content": st.one_of(plain, st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                     "text": plain})), texts),
    },
    optional={"name": st.one_of(plain, json_values)},
)  # fmt: skip
chat_fields = {
    "messages": mostly(st.lists(message_like, min_size=1, max_size=3), st.lists(json_values)),
    "max_tokens": completion_fields["max_tokens"],
    "max_completion_tokens": completion_fields["max_tokens"],
    "temperature": completion_fields["temperature"],
    "logprobs": mostly(st.booleans(), st.integers(-1, 3)),
    "top_logprobs": mostly(st.one_of(st.integers(0, 20), st.none()), st.integers(-1, 25)),
    "stop": completion_fields["stop"],
    "model": completion_fields["model"],
    "n": completion_fields["n"],
    "stream_options": mostly(st.none(), st.fixed_dictionaries({"include_usage": json_values})),
}
chat_bodies = st.fixed_dictionaries(
    {"messages": chat_fields["messages"]},
    optional={k: v for k, v in chat_fields.items() if k != "messages"},
)


@settings(FUZZ, max_examples=40)
@given(
    body=st.one_of(chat_bodies, chat_bodies, st.dictionaries(texts, json_values, max_size=3)),
    ascii_only=st.booleans(),
)
def test_fuzz_chat_completions(
    make_client: ClientFactory, facade: StoreFacade, body: Any, ascii_only: bool
) -> None:
    """Odd chat requests get OpenAI-shaped errors, never a 500; answers have one choice."""
    client = make_client(**LIMITS)
    response = send(
        client, "POST", "/v1/chat/completions", body_bytes(body, ascii_only), "application/json"
    )
    check(response)
    if response.status_code == 200:
        (choice,) = response.json()["choices"]
        assert choice["message"]["role"] == "assistant"
        assert isinstance(choice["message"]["content"], str)
