"""A feed item's new version into the store, each in one transaction: its edits queued
slot by slot with their provenance, or its edits' slots forgotten when it is retracted.

The poller (:mod:`daemon.feeds.poller`) decides what an item asks for (extraction,
superseding the slot's earlier edit); these verbs write it all or nothing, so a crash
between two slots never leaves an item half-recorded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from daemon.errors import SupersedeNotAllowedError
from store import editlog, intake
from store.db import Store
from store.feeds import ITEM_EDIT_EVENT, record_feed_item, remove_item_edit, set_item_edit
from store.intake import EnqueueResult
from store.ownership import Origin, check_may_replace
from store.queue import EditQueue
from store.schema import EditStatus, RequestLimits, SourceKind

log = structlog.get_logger()


@dataclass(frozen=True)
class SlotRequest:
    """One slot of an item's version: the edit request to queue for it, and how it was
    extracted (kept as the edit's provenance)."""

    slot: str
    request: dict[str, Any]
    extractor: str
    evidence: str


@dataclass(frozen=True)
class SlotOutcome:
    """What became of one slot: its edit's id, or why the request was rejected."""

    slot: str
    edit_id: str | None
    reason: str | None


def queue_item_version(
    store: Store,
    feed: str,
    item_id: str,
    content_hash: str,
    slots: Sequence[SlotRequest],
    *,
    limits: RequestLimits,
) -> list[SlotOutcome]:
    """Record the item's version (``content_hash``) and queue one edit per slot, in one
    transaction. A request whose ``supersedes`` names an edit this feed did not make is
    stored rejected. The item keeps its first edit's id, and the rejections as its error."""
    queue = EditQueue(store)
    out: list[SlotOutcome] = []
    with store.write():
        record_feed_item(store, feed, item_id, content_hash=content_hash)
        for slot in slots:
            result = _refused_supersede(store, feed, slot.request)
            if result is None:
                result = queue.submit(slot.request, limits=limits, source_kind=SourceKind.FEED)
            provenance = {
                "feed": feed,
                "item_id": item_id,
                "slot": slot.slot,
                "extractor": slot.extractor,
                "evidence": slot.evidence,
                "created": result.created,
                "status": result.status.value,
            }
            editlog.append(store, ITEM_EDIT_EVENT, edit_id=result.id, data=provenance)
            if result.status is EditStatus.REJECTED:
                out.append(SlotOutcome(slot.slot, None, result.reason))
                continue
            set_item_edit(
                store,
                feed,
                item_id,
                slot.slot,
                result.id,
                extractor=slot.extractor,
                evidence=slot.evidence,
            )
            out.append(SlotOutcome(slot.slot, result.id, None))
        made = [o.edit_id for o in out if o.edit_id is not None]
        errors = [f"slot {o.slot}: rejected: {o.reason}" for o in out if o.edit_id is None]
        if made or errors:
            record_feed_item(
                store,
                feed,
                item_id,
                content_hash=content_hash,
                edit_id=made[0] if made else None,
                error="; ".join(errors) or None,
            )
    return out


def forget_item_edits(
    store: Store, feed: str, item_id: str, content_hash: str, slots: Iterable[str]
) -> None:
    """Record the item's version (``content_hash``) and forget these slots' edits (they
    were retracted), in one transaction."""
    with store.write():
        for slot in slots:
            remove_item_edit(store, feed, item_id, slot)
        record_feed_item(store, feed, item_id, content_hash=content_hash)


def _refused_supersede(store: Store, feed: str, request: dict[str, Any]) -> EnqueueResult | None:
    """Store ``request`` as rejected when its ``supersedes`` names an edit this feed did not
    make (the result), else ``None``."""
    target = request.get("supersedes")
    if not isinstance(target, str):
        return None  # absent, or invalid: intake rejects it with the field's reason
    try:
        check_may_replace(store, Origin(SourceKind.FEED, feed), target)
    except SupersedeNotAllowedError as exc:
        client_id = request.get("id") if isinstance(request.get("id"), str) else None
        log.warning("feed_supersede_refused", feed=feed, supersedes=target)
        return intake.reject(store, request, exc, client_id=client_id, source_kind=SourceKind.FEED)
    return None
