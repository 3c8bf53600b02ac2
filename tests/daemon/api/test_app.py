"""Every route of the HTTP API against a real store and the micro world model."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi.testclient import TestClient

from daemon.model.generate import greedy_continuations
from store.schema import EditStatus
from tests.daemon.api.conftest import (
    JSON,
    MODEL_NAME,
    TOKEN,
    ClientFactory,
    StoreFacade,
    assert_error,
)


def edit(n: int, **extra: object) -> dict[str, object]:
    return {"prompt": f"The CEO of Acme{n} is", "target": f" Jane Roe {n}", **extra}


def submit(client: TestClient, *edits: object) -> list[str]:
    response = client.post("/v1/edits", json={"edits": list(edits)})
    assert response.status_code == 202, response.text
    ids: list[str] = response.json()["ids"]
    return ids


# --- edits ---------------------------------------------------------------------------------


def test_submit_returns_ids_in_order_and_stores_rejects(client: TestClient) -> None:
    """Valid and invalid requests both get ids, in request order; invalid ones are rejected."""
    response = client.post("/v1/edits", json={"edits": [edit(1), {"prompt": "x"}, edit(2)]})
    assert response.status_code == 202
    body = response.json()
    assert len(body["ids"]) == 3
    assert [r["id"] for r in body["results"]] == body["ids"]
    assert [r["status"] for r in body["results"]] == ["queued", "rejected", "queued"]
    assert body["results"][1]["reason"]
    rejected = client.get(f"/v1/edits/{body['ids'][1]}").json()
    assert rejected["status"] == "rejected"
    assert rejected["raw_request"] == '{"prompt": "x"}'


def test_submit_is_idempotent_for_client_ids(client: TestClient) -> None:
    """The same client id with the same content returns the existing edit, not a new one."""
    first = client.post("/v1/edits", json={"edits": [edit(1, id="mine")]}).json()
    again = client.post("/v1/edits", json={"edits": [edit(1, id="mine")]}).json()
    assert first["ids"] == again["ids"] == ["mine"]
    assert again["results"][0]["created"] is False


def test_get_edit_returns_the_record(client: TestClient) -> None:
    (edit_id,) = submit(client, edit(1, id="e1"))
    record = client.get(f"/v1/edits/{edit_id}").json()
    assert record["id"] == "e1"
    assert record["status"] == "queued"
    assert record["request"]["target"] == " Jane Roe 1"


def test_unknown_edit_is_404(client: TestClient) -> None:
    error = assert_error(client.get("/v1/edits/nope"), 404)
    assert error["type"] == "not_found"
    assert_error(client.delete("/v1/edits/nope"), 404)


def test_list_pages_through_edits(client: TestClient) -> None:
    """``next_after`` chains pages in queue order and is null on the last page."""
    ids = submit(client, *(edit(n) for n in range(5)))
    seen: list[str] = []
    after: str | None = None
    while True:
        params: dict[str, str | int] = {"limit": 2}
        if after is not None:
            params["after"] = after
        page = client.get("/v1/edits", params=params).json()
        seen.extend(r["id"] for r in page["edits"])
        after = page["next_after"]
        if after is None:
            break
    assert seen == ids


def test_list_filters_by_status(client: TestClient) -> None:
    submit(client, edit(1), {"prompt": "bad"}, edit(2))
    rejected = client.get("/v1/edits", params={"status": "rejected"}).json()
    assert [r["status"] for r in rejected["edits"]] == ["rejected"]
    assert rejected["next_after"] is None


def test_list_rejects_bad_query_values(client: TestClient) -> None:
    assert_error(client.get("/v1/edits", params={"status": "bogus"}), 422, "status")
    assert_error(client.get("/v1/edits", params={"limit": 0}), 422, "limit")
    assert_error(client.get("/v1/edits", params={"limit": "ten"}), 422, "limit")
    assert_error(client.get("/v1/edits", params={"after": "unknown"}), 422, "after")


def test_delete_retracts_and_second_delete_conflicts(client: TestClient) -> None:
    (edit_id,) = submit(client, edit(1))
    response = client.delete(f"/v1/edits/{edit_id}", params={"reason": "wrong fact"})
    assert response.status_code == 200
    assert response.json()["status"] == "retracted"
    assert client.get(f"/v1/edits/{edit_id}").json()["status"] == "retracted"
    error = assert_error(client.delete(f"/v1/edits/{edit_id}"), 409)
    assert error["type"] == "conflict"


def test_rejected_edit_cannot_be_retracted(client: TestClient) -> None:
    (edit_id,) = submit(client, {"prompt": "no target"})
    assert_error(client.delete(f"/v1/edits/{edit_id}"), 409)


# --- completions -------------------------------------------------------------------------


def test_greedy_completion_matches_greedy_continuations(
    client: TestClient, facade: StoreFacade
) -> None:
    """temperature 0 gives the greedy continuation, one choice per prompt, in order."""
    prompts = ["The capital of Vonmark is", "Shus Fismou works for"]
    response = client.post(
        "/v1/completions",
        json={"model": MODEL_NAME, "prompt": prompts, "max_tokens": 8, "temperature": 0},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["model"] == MODEL_NAME
    assert isinstance(body["created"], int)
    world = facade.world
    expected = greedy_continuations(world.model, world.tokenizer, prompts, max_new_tokens=8)
    assert [c["text"] for c in body["choices"]] == expected
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["logprobs"] is None for c in body["choices"])
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    assert facade.routing.calls == [(p,) for p in prompts]


def test_completion_logprobs_and_stop(client: TestClient) -> None:
    response = client.post(
        "/v1/completions",
        json={
            "prompt": "The capital of Vonmark is",
            "max_tokens": 8,
            "temperature": 0,
            "logprobs": 2,
            "stop": ".",
        },
    )
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    assert "." not in choice["text"]
    assert choice["finish_reason"] == "stop"
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert all(lp <= 0 for lp in logprobs["token_logprobs"])
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"][0] == len("The capital of Vonmark is")


def test_completion_limits_are_400_with_param(make_client: ClientFactory) -> None:
    """Validation errors on the OpenAI-compatible routes are OpenAI's 400
    ``invalid_request_error`` naming the ``param`` (editd's routes keep 422)."""
    client = make_client(max_prompts_per_completion=2, max_tokens_limit=4)
    too_many = client.post("/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 1})
    assert assert_error(too_many, 400, "prompt")["type"] == "invalid_request_error"
    assert_error(
        client.post("/v1/completions", json={"prompt": "a", "max_tokens": 5}), 400, "max_tokens"
    )
    five_stops = {"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}
    assert_error(client.post("/v1/completions", json=five_stops), 400, "stop")
    assert_error(
        client.post("/v1/completions", json={"prompt": "a", "logprobs": 6}), 400, "logprobs"
    )
    assert_error(client.post("/v1/completions", json={"prompt": []}), 400)
    assert_error(client.post("/v1/completions", json={"prompt": "a", "n": 2}), 400, "n")
    assert_error(client.post("/v1/completions", json={"prompt": 5}), 400)
    assert_error(client.post("/v1/completions", json={"prompt": "a", "max_tokens": "2"}), 400)
    unknown = assert_error(client.post("/v1/completions", json={"prompt": "a", "best_of": 2}), 400)
    assert unknown["code"] == "unknown_parameter" and unknown["param"] == "best_of"
    missing = assert_error(client.post("/v1/completions", json={"max_tokens": 1}), 400, "prompt")
    assert missing["code"] == "missing_required_parameter"
    assert_error(client.post("/v1/edits", json={"edits": 3}), 422, "edits")


def test_completion_rejects_lone_surrogates(client: TestClient) -> None:
    body = b'{"prompt": "a\\ud800", "max_tokens": 1}'
    response = client.post(
        "/v1/completions", content=body, headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "prompt")


# --- status, health, metrics, checkpoints ------------------------------------------------


def test_status_health_and_metrics(client: TestClient) -> None:
    submit(client, edit(1))
    status = client.get("/v1/status").json()
    assert status["queue_depth"] == 1
    assert client.get("/healthz").json() == {"status": "ok"}
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "editd_test_calls_total 1.0" in metrics.text


def test_not_ready_is_503(client: TestClient, facade: StoreFacade) -> None:
    """Before the model is loaded: healthz says starting, model routes are unavailable."""
    facade.ready = False
    health = client.get("/healthz")
    assert health.status_code == 503
    assert health.json() == {"status": "starting"}
    assert_error(client.post("/v1/completions", json={"prompt": "a"}), 503)
    assert_error(client.post("/v1/checkpoints", headers=JSON), 503)
    assert client.get("/v1/edits").status_code == 200


def test_checkpoint_route(client: TestClient, facade: StoreFacade) -> None:
    response = client.post("/v1/checkpoints", headers=JSON)
    assert response.status_code == 201
    assert response.json()["id"] == "ckpt-1"
    assert facade.checkpoints == 1
    restored = client.post("/v1/checkpoints/ckpt-1/restore", headers=JSON)
    assert restored.status_code == 200
    assert restored.json()["checkpoint_id"] == "ckpt-1"
    drift = client.post("/v1/drift", headers=JSON)
    assert drift.status_code == 409
    assert "disabled" in drift.json()["error"]["message"]
    missing = client.post("/v1/checkpoints/nope/restore", headers=JSON)
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found"


def test_openapi_documents_request_bodies(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert set(paths) >= {
        "/v1/edits",
        "/v1/edits/{edit_id}",
        "/v1/completions",
        "/v1/checkpoints",
        "/v1/status",
        "/healthz",
        "/metrics",
    }
    assert "requestBody" in paths["/v1/edits"]["post"]
    assert "requestBody" in paths["/v1/completions"]["post"]
    assert "CompletionBody" in spec["components"]["schemas"]
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


# --- auth --------------------------------------------------------------------------------


def test_token_guards_mutating_routes(make_client: ClientFactory, auth: dict[str, str]) -> None:
    client = make_client(token=TOKEN)
    body = {"edits": [edit(1)]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        error = assert_error(client.post("/v1/edits", json=body, headers=headers), 401)
        assert error["type"] == "unauthorized"
    assert client.get("/v1/edits", headers=auth).json()["edits"] == []
    response = client.post("/v1/edits", json=body, headers=auth)
    assert response.status_code == 202
    (edit_id,) = response.json()["ids"]
    assert_error(client.delete(f"/v1/edits/{edit_id}"), 401)
    assert_error(client.post("/v1/checkpoints", headers=JSON), 401)
    assert client.delete(f"/v1/edits/{edit_id}", headers=auth).status_code == 200
    assert client.post("/v1/checkpoints", headers={**auth, **JSON}).status_code == 201
    assert client.get(f"/v1/edits/{edit_id}", headers=auth).status_code == 200


def test_no_token_leaves_routes_open(client: TestClient) -> None:
    assert client.post("/v1/edits", json={"edits": [edit(1)]}).status_code == 202
    assert client.post("/v1/checkpoints", headers=JSON).status_code == 201


def test_401_comes_before_body_parsing(make_client: ClientFactory) -> None:
    client = make_client(token=TOKEN)
    response = client.post(
        "/v1/edits", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_error(response, 401)


# --- limits and malformed input ----------------------------------------------------------


def test_body_over_the_limit_is_413(make_client: ClientFactory) -> None:
    client = make_client(max_request_bytes=200)
    big = {"edits": [edit(1, rephrases=["x" * 300])]}
    assert_error(client.post("/v1/edits", json=big), 413)


def test_chunked_body_over_the_limit_is_413(make_client: ClientFactory) -> None:
    """Without Content-Length the bytes actually received are counted."""
    client = make_client(max_request_bytes=200)

    def chunks() -> Iterator[bytes]:
        yield b'{"edits": ['
        for _ in range(20):
            yield b'{"prompt": "aaaaaaaaaaaa", "target": "b"},'
        yield b"{}]}"

    response = client.post(
        "/v1/edits", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert_error(response, 413)


def test_too_many_edits_is_413_with_field(make_client: ClientFactory) -> None:
    client = make_client(max_edits_per_request=2)
    error = assert_error(
        client.post("/v1/edits", json={"edits": [edit(1), edit(2), edit(3)]}), 413, "edits"
    )
    assert error["type"] == "payload_too_large"
    assert client.get("/v1/edits").json()["edits"] == []


def test_malformed_json_is_400(client: TestClient) -> None:
    response = client.post(
        "/v1/edits", content=b'{"edits": [', headers={"content-type": "application/json"}
    )
    error = assert_error(response, 400)
    assert error["type"] == "bad_request"


def test_wrong_shapes_are_422_with_field(client: TestClient) -> None:
    assert_error(client.post("/v1/edits", json={"edits": "x"}), 422, "edits")
    assert_error(client.post("/v1/edits", json={}), 422, "edits")
    assert_error(client.post("/v1/edits", json=[1, 2]), 422)
    assert_error(client.post("/v1/edits", json={"edits": [], "extra": 1}), 422, "extra")


def test_non_json_content_type_is_415(client: TestClient) -> None:
    response = client.post(
        "/v1/edits", content=b'{"edits": []}', headers={"content-type": "text/plain"}
    )
    assert_error(response, 415)


def test_unknown_route_and_method(client: TestClient) -> None:
    assert_error(client.get("/v1/nothing"), 404)
    error = assert_error(client.put("/v1/edits/x"), 405)
    assert error["type"] == "method_not_allowed"
    assert_error(client.delete("/v1/status"), 405)


def test_retract_status_visible_in_list(client: TestClient) -> None:
    ids = submit(client, edit(1), edit(2))
    client.delete(f"/v1/edits/{ids[0]}")
    retracted = client.get("/v1/edits", params={"status": EditStatus.RETRACTED.value}).json()
    assert [r["id"] for r in retracted["edits"]] == [ids[0]]


def test_omitted_max_tokens_is_capped_at_the_limit(make_client: ClientFactory) -> None:
    """The default of 16 new tokens gives way to a lower server limit instead of a 422."""
    client = make_client(max_tokens_limit=2)
    response = client.post("/v1/completions", json={"prompt": "The", "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 2
