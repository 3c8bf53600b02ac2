"""The request guard on a live server: Host, Origin, JSON content type, who may read.

Loopback is not a trust boundary: a web page can make a browser send requests to
127.0.0.1, and DNS rebinding lets it read the answers. These tests send what such
a page would.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.api.app import host_allowed, needs_token, reload_settings
from daemon.cli.client import call
from daemon.config import ApiConfig, Config, load_config
from daemon.errors import ConfigError
from tests.daemon.api.conftest import (
    JSON,
    TOKEN,
    LiveServer,
    ServerFactory,
    StoreFacade,
    assert_error,
)

EDIT = {"prompt": "The CEO of Acme is", "target": " Jane Roe"}
BODYLESS_POSTS = [
    "/v1/nightly",
    "/v1/checkpoints",
    "/v1/checkpoints/ckpt-1/restore",
    "/v1/drift",
    "/v1/feeds/poll",
]
READS = ["/v1/edits", "/v1/edits/some-id", "/v1/feeds", "/v1/status", "/metrics", "/openapi.json"]


def get(server: LiveServer, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(server.url(path), timeout=10, **kwargs)


def post(server: LiveServer, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(server.url(path), timeout=10, **kwargs)


# --- Host: DNS rebinding ---------------------------------------------------------------


def test_a_foreign_host_header_is_421(make_server: ServerFactory, facade: StoreFacade) -> None:
    """A rebound name (the attacker's domain pointing at 127.0.0.1) reaches no route."""
    server = make_server()
    port = server.port
    for host in (f"attacker.example:{port}", "attacker.example", "127.0.0.1.attacker.example"):
        error = assert_error(get(server, "/v1/status", headers={"Host": host}), 421)
        assert error["type"] == "misdirected_request"
        assert_error(post(server, "/v1/edits", json={"edits": [EDIT]}, headers={"Host": host}), 421)
    assert facade.queue.counts()["queued"] == 0
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert get(server, "/v1/status", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_adds_names_and_star_allows_any(make_server: ServerFactory) -> None:
    named = make_server(allowed_hosts=("editd.internal",))
    assert get(named, "/v1/status", headers={"Host": "editd.internal:80"}).status_code == 200
    assert_error(get(named, "/v1/status", headers={"Host": "other.internal"}), 421)
    anything = make_server(allowed_hosts=("*",))
    assert get(anything, "/v1/status", headers={"Host": "other.internal"}).status_code == 200


def test_the_bind_address_and_the_local_address_are_allowed() -> None:
    """The bind host (unless a wildcard) and the address a connection came in on."""
    scope: dict[str, Any] = {"server": ("10.1.2.3", 8765)}
    assert host_allowed("10.1.2.3", scope, ApiConfig(host="0.0.0.0"))
    assert host_allowed("editd.lan", {"server": None}, ApiConfig(host="editd.lan"))
    assert not host_allowed("0.0.0.0", {"server": None}, ApiConfig(host="0.0.0.0"))
    assert not host_allowed("evil.example", scope, ApiConfig(host="0.0.0.0"))


# --- Origin: cross-site requests ---------------------------------------------------------


def test_a_foreign_origin_is_403(make_server: ServerFactory, facade: StoreFacade) -> None:
    """What a browser sends from another site (or a sandboxed frame) is refused; the
    daemon's own origin is fine."""
    server = make_server()
    for origin in ("http://evil.example", "null", f"http://localhost:{server.port + 1}"):
        headers = {"Origin": origin}
        response = post(server, "/v1/edits", json={"edits": [EDIT]}, headers=headers)
        error = assert_error(response, 403)
        assert error["type"] == "forbidden"
        assert_error(get(server, "/v1/edits", headers=headers), 403)
    assert facade.queue.counts()["queued"] == 0
    own = {"Origin": f"http://127.0.0.1:{server.port}"}
    assert post(server, "/v1/edits", json={"edits": [EDIT]}, headers=own).status_code == 202


# --- Content-Type: no simple (preflight-free) POSTs ------------------------------------------


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_every_post_needs_a_json_content_type(
    make_server: ServerFactory, facade: StoreFacade, content_type: str | None
) -> None:
    """A page can POST these without a CORS preflight (no body needed); a JSON content
    type, which needs one, is required on every POST."""
    server = make_server()
    headers = {} if content_type is None else {"Content-Type": content_type}
    for path in [*BODYLESS_POSTS, "/v1/edits"]:
        error = assert_error(post(server, path, headers=headers), 415)
        assert error["type"] == "unsupported_media_type"
    for path in ["/v1/completions", "/v1/chat/completions"]:  # OpenAI's shape there
        error = assert_error(post(server, path, headers=headers), 415)
        assert error["code"] == "unsupported_media_type"
    assert facade.nightly_triggers == []
    assert facade.checkpoints == 0


def test_the_cli_client_sends_json_on_bodyless_posts(
    make_server: ServerFactory, facade: StoreFacade
) -> None:
    """``editd nightly``/``checkpoint create`` go through the client, which declares JSON."""
    server = make_server(token=TOKEN)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert_error(post(server, "/v1/nightly", headers=bearer), 415)
    cfg = Config(api=ApiConfig(port=server.port, token=TOKEN))
    assert call(cfg, "POST", "/v1/nightly")["started"] is True
    assert call(cfg, "POST", "/v1/checkpoints")["id"] == "ckpt-1"
    assert call(cfg, "GET", "/v1/status")["queue_depth"] == 0
    assert facade.nightly_triggers == ["api"]


# --- the token on reads ------------------------------------------------------------------


def test_with_a_token_reads_need_it_too(make_server: ServerFactory) -> None:
    server = make_server(token=TOKEN)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for path in READS:
        assert_error(get(server, path), 401)
        assert get(server, path, headers=bearer).status_code in (200, 404), path
    assert get(server, "/healthz").json() == {"status": "ok"}


def test_public_reads_open_the_reads_only(make_server: ServerFactory) -> None:
    server = make_server(token=TOKEN, public_reads=True)
    for path in READS:
        assert get(server, path).status_code in (200, 404), path
    assert_error(post(server, "/v1/edits", json={"edits": [EDIT]}), 401)
    assert_error(post(server, "/v1/checkpoints", headers=JSON), 401)
    assert_error(post(server, "/v1/completions", json={"prompt": "a", "max_tokens": 1}), 401)


def test_which_routes_need_the_token() -> None:
    guarded = ApiConfig(token=TOKEN)
    assert not needs_token("GET", "/healthz", guarded)
    assert needs_token("GET", "/metrics", guarded)
    assert needs_token("POST", "/v1/completions", guarded)
    open_completions = replace(guarded, completions_require_token=False)
    assert not needs_token("POST", "/v1/completions", open_completions)
    assert not needs_token("GET", "/v1/status", replace(guarded, public_reads=True))
    assert not needs_token("POST", "/v1/edits", ApiConfig())


def test_reload_settings_rotates_the_token(make_server: ServerFactory) -> None:
    """The next request after a reload needs the new token; the old one is refused."""
    server = make_server(token=TOKEN, max_concurrent_completions=3)
    new = "rotated-token-0123456789"
    applied = reload_settings(server.app, ApiConfig(token=new, max_concurrent_completions=9))
    assert applied.token == new
    assert applied.max_concurrent_completions == 3  # needs a restart
    assert_error(get(server, "/v1/status", headers={"Authorization": f"Bearer {TOKEN}"}), 401)
    assert get(server, "/v1/status", headers={"Authorization": f"Bearer {new}"}).status_code == 200


# --- the token itself ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [("short", "at least 16 characters"), ("has a space in it 0123", "without spaces")],
)
def test_a_weak_token_is_a_config_error(tmp_path: Path, value: str, message: str) -> None:
    path = tmp_path / "editd.toml"
    path.write_text(f'[api]\ntoken = "{value}"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path, env={})
    assert caught.value.key == "api.token"
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "none.toml", env={"EDITD_API_TOKEN": value}, missing_ok=True)


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        ('allowed_hosts = ["editd.lan:8765"]', "allowed_hosts", "without a port"),
        ("max_concurrent_completions = 0", "max_concurrent_completions", "between 1 and 32"),
        ("max_concurrent_completions = 33", "max_concurrent_completions", "between 1 and 32"),
        ("max_connections = 0", "max_connections", "must be > 0"),
        ("request_header_timeout_s = 0", "request_header_timeout_s", "must be > 0"),
    ],
)
def test_api_limits_are_validated(tmp_path: Path, body: str, key: str, message: str) -> None:
    path = tmp_path / "editd.toml"
    path.write_text(f"[api]\n{body}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path, env={})
    assert caught.value.key == f"api.{key}"
