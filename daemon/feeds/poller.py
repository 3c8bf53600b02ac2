"""The feed poller: fetch due feeds, turn their items into edits, remember what was seen.

One poll of one feed:

1. **Fetch** with the stored validators (conditional GET). ``304`` ends the poll;
   ``410`` disables the feed (``paused``, with the reason); a permanent redirect
   stores the new URL; a network or HTTP failure is recorded on the feed (status
   ``error``, ``last_error``) and the feed waits longer before its next poll
   (interval x 2^failures, at most 16x). Nothing here stops other feeds.
2. **Parse** (JSON Feed, Atom, RSS). A malformed document is recorded like a fetch
   failure; a malformed item is remembered with its reason and the others go on.
3. **Items.** An item is known by ``(feed, item id)`` and a hash of its content:
   unchanged items are skipped. A new or changed item becomes edit requests, from
   its ``_fact_edit`` extension (slot ``fact_edit``) or, for plain items, from the
   extractors (one slot per relation and subject). Each request carries the source
   ``{"kind": "feed", "url": <feed URL>, "item_id": <item id>}``. A changed item's
   request for a slot ``supersedes`` the slot's earlier edit (the worker retracts
   it when the new one is applied); a slot the changed item no longer fills is
   retracted. ``"op": "retract"`` retracts the item's edit (or the one named by
   ``edit_id``/``supersedes``). A feed supersedes or retracts only edits that it
   made (``store.ownership``): a request whose ``supersedes`` names another
   source's edit is stored as ``rejected`` with the reason, and the item records
   it; a retraction of another source's edit is refused. An extension ``id`` is
   the edit's idempotency key for the item's first version; a changed version gets
   ``<id>@<hash prefix>``, so the key is not refused as reused for different content.
4. **Exactly once.** The requests of an item, its slots and its hash are written in
   one store transaction: a crash before it leaves the item unseen, so the next poll
   submits it again (intake deduplicates a request whose content is already live);
   after it the item is known. Retractions run before that transaction (they change
   the model, under the engine's lock); retracting twice is harmless.

Every edit an item produces is recorded with its provenance (extractor, rule, and
the text it matched for extracted edits) in ``feed_item_edits`` and the event log.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import structlog

from daemon.config import Config, request_limits
from daemon.errors import (
    EditdError,
    FeedFetchError,
    FeedParseError,
    InvalidTransitionError,
    SupersedeNotAllowedError,
)
from daemon.feeds.extract import Extraction, Extractor, build_extractors
from daemon.feeds.fetch import FetchOutcome, FetchPolicy, fetch_feed
from daemon.feeds.parse import FeedEntry, parse_feed
from store import feed_updates
from store import feeds as feed_store
from store.db import Store
from store.feeds import Feed
from store.ownership import Origin, check_may_replace
from store.queue import EditQueue
from store.schema import SourceKind

log = structlog.get_logger()

FACT_EDIT_SLOT = "fact_edit"
_MAX_BACKOFF_FACTOR = 16
_NO_ID = "(no id)"

Retract = Callable[[str, str], object]
"""``retract(edit_id, reason)``: the daemon's (model and store) or the store's alone."""


@dataclass
class PollReport:
    """What one poll of one feed did."""

    feed: str
    outcome: str  # ok | not_modified | gone | error
    url: str
    items: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    malformed: int = 0
    edits: list[str] = field(default_factory=list)
    retracted: list[str] = field(default_factory=list)
    rejected: int = 0
    error: str | None = None

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-friendly form for the API, CLI and log."""
        return dict(self.__dict__)


class FeedPoller:
    """Polls the store's feeds; ``retract`` is how an item's ``op: retract`` is carried out."""

    def __init__(
        self,
        store: Store,
        config: Config,
        *,
        retract: Retract,
        extractors: Sequence[Extractor] | None = None,
        client: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = store
        self.queue = EditQueue(store)
        self.limits = request_limits(config)
        cfg = config.feeds
        self.policy = FetchPolicy(
            timeout_s=cfg.timeout_s,
            max_bytes=cfg.max_bytes,
            user_agent=cfg.user_agent,
            retries=cfg.retries,
            backoff_s=cfg.backoff_s,
            allow_hosts=cfg.allow_hosts,
        )
        self.extractors = list(build_extractors(cfg) if extractors is None else extractors)
        self.retract = retract
        self.client = client
        self.sleep = sleep

    def poll_due(self, *, should_stop: Callable[[], bool] = lambda: False) -> list[PollReport]:
        """Poll every feed that is due now; one failing feed never stops the others."""
        reports = []
        with self._shared_client():
            for feed in feed_store.due_feeds(self.store):
                if should_stop():
                    break
                reports.append(self.poll_feed(feed))
        return reports

    def poll(self, name: str) -> PollReport:
        """Poll the feed called ``name`` now, due or not (a paused feed too)."""
        feed = feed_store.get_feed(self.store, name)
        with self._shared_client():
            return self.poll_feed(feed)

    @contextmanager
    def _shared_client(self) -> Iterator[None]:
        """One HTTP client (connection pool) for the polls of one run, unless one was given."""
        if self.client is not None:
            yield
            return
        with httpx.Client(timeout=self.policy.timeout_s) as client:
            self.client = client
            try:
                yield
            finally:
                self.client = None

    def poll_feed(self, feed: Feed) -> PollReport:
        """One poll of ``feed``; errors are recorded on the feed and in the report."""
        try:
            report = self._poll(feed)
        except (FeedFetchError, FeedParseError) as exc:
            report = self._failed(feed, str(exc))
        except Exception as exc:  # a bug must not stop the other feeds
            log.exception("feed_poll_crashed", feed=feed.name)
            report = self._failed(feed, f"internal error: {type(exc).__name__}: {exc}")
        log.info("feed_polled", **{k: v for k, v in report.to_json_dict().items() if k != "edits"})
        return report

    # --- one poll ------------------------------------------------------------------

    def _poll(self, feed: Feed) -> PollReport:
        result = fetch_feed(
            feed.url,
            etag=feed.etag,
            last_modified=feed.last_modified,
            policy=self.policy,
            client=self.client,
            sleep=self.sleep,
        )
        moved_to = result.url if result.moved else None
        if result.outcome is FetchOutcome.GONE:
            reason = f"HTTP 410 Gone at {result.url}: the feed was withdrawn; disabled"
            feed_store.disable_feed(self.store, feed.name, reason)
            return PollReport(feed.name, "gone", result.url, error=reason)
        if result.outcome is FetchOutcome.NOT_MODIFIED:
            self._record_success(feed, result.etag, result.last_modified, moved_to)
            return PollReport(feed.name, "not_modified", result.url)
        parsed = parse_feed(result.body, result.content_type)
        # Items are attributed to the URL the feed lives at now.
        report = PollReport(feed.name, "ok", result.url, items=len(parsed.entries))
        for error in parsed.item_errors:
            item_id = error.item_id or f"{_NO_ID} #{error.index}"
            self._record_malformed(feed.name, item_id, None, error.reason)
            report.malformed += 1
        for entry in parsed.entries:
            self._item(feed.name, result.url, entry, report)
        self._record_success(feed, result.etag, result.last_modified, moved_to)
        return report

    def _failed(self, feed: Feed, reason: str) -> PollReport:
        factor = min(2**feed.failures, _MAX_BACKOFF_FACTOR)
        next_poll = self.store.now() + feed.interval_s * factor
        feed_store.record_feed_poll(self.store, feed.name, error=reason, next_poll_at=next_poll)
        return PollReport(feed.name, "error", feed.url, error=reason)

    def _record_success(
        self, feed: Feed, etag: str | None, last_modified: str | None, moved_to: str | None
    ) -> None:
        feed_store.record_feed_poll(
            self.store, feed.name, etag=etag, last_modified=last_modified, url=moved_to
        )
        if moved_to is not None:
            log.info("feed_moved", feed=feed.name, old=feed.url, new=moved_to)

    # --- one item ------------------------------------------------------------------

    def _item(self, feed: str, url: str, entry: FeedEntry, report: PollReport) -> None:
        known = feed_store.get_feed_item(self.store, feed, entry.item_id)
        if known is not None and known.content_hash == entry.content_hash:
            report.unchanged += 1
            return
        if known is None:
            report.new += 1
        else:
            report.changed += 1
        try:
            self._apply_item(feed, url, entry, report)
        except Exception as exc:  # one bad item must not stop the feed
            log.exception("feed_item_failed", feed=feed, item_id=entry.item_id)
            # No content hash: the item is tried again at the next poll.
            self._record_malformed(feed, entry.item_id, None, f"{type(exc).__name__}: {exc}")
            report.malformed += 1

    def _apply_item(self, feed: str, url: str, entry: FeedEntry, report: PollReport) -> None:
        slots = feed_store.item_edits(self.store, feed, entry.item_id)
        fact_edit = dict(entry.fact_edit) if entry.fact_edit is not None else None
        if fact_edit is not None and str(fact_edit.get("op", "update")) == "retract":
            self._retract_item(feed, entry, fact_edit, slots, report)
            return
        wanted = self._extractions(entry, fact_edit)
        for slot, old in slots.items():  # slots the new version no longer fills
            if slot not in wanted and self._retract(old.edit_id, feed, entry.item_id, "changed"):
                report.retracted.append(old.edit_id)
        requests = [
            self._slot_request(url, entry, slot, extraction, slots.get(slot))
            for slot, extraction in wanted.items()
        ]
        outcomes = feed_updates.queue_item_version(
            self.store, feed, entry.item_id, entry.content_hash, requests, limits=self.limits
        )
        report.rejected += sum(1 for o in outcomes if o.edit_id is None)
        report.edits.extend(o.edit_id for o in outcomes if o.edit_id is not None)

    def _slot_request(
        self,
        url: str,
        entry: FeedEntry,
        slot: str,
        extraction: Extraction,
        previous: feed_store.ItemEdit | None,
    ) -> feed_updates.SlotRequest:
        """One slot's edit request: the extraction with the item as its source; a new
        version of a slot supersedes the slot's earlier edit, under an id of its own."""
        request = dict(extraction.request)
        request["source"] = {"kind": "feed", "url": url, "item_id": entry.item_id}
        if previous is not None:
            request.setdefault("supersedes", previous.edit_id)
            if isinstance(request.get("id"), str):
                request["id"] = f"{request['id']}@{entry.content_hash[:12]}"
        return feed_updates.SlotRequest(
            slot, request, extractor=extraction.extractor, evidence=extraction.evidence
        )

    def _extractions(
        self, entry: FeedEntry, fact_edit: dict[str, Any] | None
    ) -> dict[str, Extraction]:
        if fact_edit is not None:
            fact_edit.pop("op", None)
            return {FACT_EDIT_SLOT: Extraction(FACT_EDIT_SLOT, fact_edit, "fact_edit", "")}
        out: dict[str, Extraction] = {}
        for extractor in self.extractors:
            for extraction in extractor.extract(entry):
                out.setdefault(extraction.slot, extraction)
        return out

    def _retract_item(
        self,
        feed: str,
        entry: FeedEntry,
        fact_edit: dict[str, Any],
        slots: dict[str, feed_store.ItemEdit],
        report: PollReport,
    ) -> None:
        named = fact_edit.get("edit_id") or fact_edit.get("supersedes")
        targets = [str(named)] if named else [s.edit_id for s in slots.values()]
        if named:
            try:
                check_may_replace(self.store, Origin(SourceKind.FEED, feed), str(named))
            except SupersedeNotAllowedError:
                reason = f"op 'retract' names edit '{named}', which this feed did not make"
                self._record_malformed(feed, entry.item_id, entry.content_hash, reason)
                report.malformed += 1
                return
        if not targets:
            reason = "op 'retract' names no edit (no edit_id, and the item made none)"
            self._record_malformed(feed, entry.item_id, entry.content_hash, reason)
            report.malformed += 1
            return
        for edit_id in targets:
            if self._retract(edit_id, feed, entry.item_id, "retracted by its feed"):
                report.retracted.append(edit_id)
        gone = [slot for slot, old in slots.items() if old.edit_id in targets]
        feed_updates.forget_item_edits(self.store, feed, entry.item_id, entry.content_hash, gone)

    def _retract(self, edit_id: str, feed: str, item_id: str, why: str) -> bool:
        """Retract ``edit_id``; ``False`` if it was already gone (retracted, superseded ...)
        or is not this feed's to retract (an item deduplicated into another source's edit)."""
        reason = f"{why} (feed {feed}, item {item_id})"
        try:
            check_may_replace(self.store, Origin(SourceKind.FEED, feed), edit_id)
        except SupersedeNotAllowedError as exc:
            log.warning("feed_retract_refused", edit_id=edit_id, feed=feed, reason=str(exc))
            return False
        try:
            self.retract(edit_id, reason)
        except InvalidTransitionError as exc:
            if "applying" in str(exc):
                raise  # being applied right now: the item is tried again next poll
            return False
        except EditdError as exc:
            log.warning("feed_retract_skipped", edit_id=edit_id, feed=feed, reason=str(exc))
            return False
        return True

    def _record_malformed(
        self, feed: str, item_id: str, content_hash: str | None, reason: str
    ) -> None:
        feed_store.record_feed_item(
            self.store, feed, item_id, content_hash=content_hash, error=reason[:2000]
        )
        log.warning("feed_item_malformed", feed=feed, item_id=item_id, reason=reason)
