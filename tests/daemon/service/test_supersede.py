"""Superseding edits through a real ``editd serve``, on every back-end configuration.

A superseding edit replaces the old one atomically: it takes the old edit's prompt
on MELO (which refuses a prompt another edit holds) and on the hook; if it fails,
the old edit stays in force, and a feed item records why (its next version then
replaces the edit still in force).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from store import feeds as feed_store
from store.db import Store
from tests.daemon.feeds.conftest import FeedServer, Reply, feed_server  # noqa: F401
from tests.daemon.service.conftest import DaemonProcess, write_config

LONG_TARGET = " " + " ".join(["Zorblax"] * 24)  # more tokens than any back-end takes


def jsonfeed(*items: dict[str, Any]) -> bytes:
    doc = {"version": "https://jsonfeed.org/version/1.1", "title": "facts", "items": list(items)}
    return json.dumps(doc).encode()


def targets_of(edits: list[dict[str, Any]], edit: dict[str, Any], n: int) -> list[str]:
    """``n`` other answers of the edit's relation (each changes the fact)."""
    seen = {edit["target"], edit.get("target_true")}
    out = []
    for e in edits:
        if e["relation"] == edit["relation"] and e["target"] not in seen:
            seen.add(e["target"])
            out.append(e["target"])
    return out[:n]


def answers(daemon: DaemonProcess, prompt: str, target: str) -> bool:
    """Whether the live model's greedy continuation of ``prompt`` starts with ``target``."""
    (text,) = daemon.complete([prompt], max_tokens=8)
    assert text.startswith(target), (prompt, target, text)
    return True


@pytest.mark.parametrize("backends", [["melo"], ["hook", "melo"]], ids=["melo", "hook+melo"])
def test_superseding_edits_replace_the_old_one_or_leave_it_in_force(
    backends: list[str],
    micro_world: Path,
    world_edits: list[dict[str, Any]],
    tmp_path: Path,
    daemon_factory: list[DaemonProcess],
    feed_server: FeedServer,  # noqa: F811
) -> None:
    """A feed item changed under its id, then changed to a target no back-end can take,
    then changed again; and through POST /v1/edits: ``[new supersedes old, old]`` in one
    request, a superseding edit that fails, and one that replaces a MELO edit on the
    back-end the router picks for it."""
    config = write_config(
        tmp_path,
        micro_world,
        router={"backends": backends},
        feeds={"enabled": False, "allow_hosts": ["127.0.0.1"]},
        # the long target must reach the back-ends (which cannot learn it), not stop at
        # the dispatch's target limit
        kinds={"max_target_tokens": 512},
    )
    fact = next(e for e in world_edits if e["relation"] == "profession")
    t2, t3 = targets_of(world_edits, fact, 2)
    edit = {k: fact[k] for k in ("prompt", "target", "subject", "relation", "rephrases")}
    item: dict[str, Any] = {"id": "p", "title": "t", "_fact_edit": {**edit, "id": "prof"}}
    feed_server.route("/facts.json", Reply(body=jsonfeed(item)))
    with Store.open(config.parent / "var" / "editd.sqlite3") as st:
        feed_store.upsert_feed(st, "news", feed_server.url("/facts.json"), interval_s=3600)
    daemon = DaemonProcess(config)
    daemon_factory.append(daemon)
    daemon.start()

    def poll(target: str) -> str:
        version = {**item, "_fact_edit": {**item["_fact_edit"], "target": target}}
        feed_server.route("/facts.json", Reply(body=jsonfeed(version)))
        r = daemon.request("POST", "/v1/feeds/poll", params={"name": "news"})
        assert r.status_code == 200, r.text
        (report,) = r.json()["polls"]
        (edit_id,) = report["edits"]
        assert daemon.wait_settled([edit_id])
        return str(edit_id)

    v1 = poll(fact["target"])
    assert daemon.edit(v1)["status"] == "applied"
    assert answers(daemon, fact["prompt"], fact["target"])
    v2 = poll(t2)
    assert (daemon.edit(v2)["status"], daemon.edit(v1)["status"]) == ("applied", "superseded")
    assert daemon.edit(v2)["supersedes"] == v1
    assert answers(daemon, fact["prompt"], t2)

    v3 = poll(LONG_TARGET)  # refused everywhere: v2 stays, the item says why
    failed = daemon.edit(v3)
    assert failed["status"] == "failed" and failed["supersedes"] == v2
    assert f"edit '{v2}', which it supersedes, stays applied" in failed["error"]
    assert daemon.edit(v2)["status"] == "applied"
    assert answers(daemon, fact["prompt"], t2)
    with Store.open(config.parent / "var" / "editd.sqlite3", create=False) as st:
        known = feed_store.get_feed_item(st, "news", "p")
        slot = feed_store.item_edits(st, "news", "p")["fact_edit"]
    assert known is not None and known.error is not None
    assert known.error.startswith(f"edit '{v3}' failed: melo:")
    assert slot.edit_id == v2  # the edit in force: the next version replaces it

    v4 = poll(t3)
    assert daemon.edit(v4)["supersedes"] == v2
    assert (daemon.edit(v4)["status"], daemon.edit(v2)["status"]) == ("applied", "superseded")
    assert answers(daemon, fact["prompt"], t3)

    # Through the API, both in one request (one batch): the old edit is applied first.
    other = next(e for e in world_edits if e["relation"] == "born_in")
    (o2,) = targets_of(world_edits, other, 1)
    old = {k: v for k, v in other.items() if k != "locality"}
    new = {**old, "id": "api-new", "target": o2, "supersedes": old["id"]}
    ids = daemon.submit([new, old])
    assert daemon.wait_settled(ids) == {"api-new": "applied", old["id"]: "superseded"}
    assert answers(daemon, old["prompt"], o2)
    bad = {**old, "id": "api-bad", "target": LONG_TARGET, "supersedes": "api-new"}
    assert daemon.wait_settled(daemon.submit([bad])) == {"api-bad": "failed"}
    assert "edit 'api-new', which it supersedes, stays applied" in daemon.edit("api-bad")["error"]
    assert daemon.edit("api-new")["status"] == "applied"
    assert answers(daemon, old["prompt"], o2)

    # An edit held by MELO, replaced by one the router sends to the hook (when enabled).
    third = next(e for e in world_edits if e["relation"] == "works_for")
    (w2,) = targets_of(world_edits, third, 1)
    base = {k: v for k, v in third.items() if k != "locality"}
    assert daemon.wait_settled(daemon.submit([{**base, "backend": "melo"}])) == {
        third["id"]: "applied"
    }
    moved = {**base, "id": "api-moved", "target": w2, "supersedes": third["id"]}
    ids = daemon.submit([moved])
    assert daemon.wait_settled(ids) == {"api-moved": "applied"}
    assert daemon.edit("api-moved")["backend"] == backends[0]
    assert daemon.edit(third["id"])["status"] == "superseded"
    assert answers(daemon, third["prompt"], w2)
    assert daemon.terminate() == 0
