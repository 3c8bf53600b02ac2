"""``editd feeds list|add|remove|poll`` and ``editd nightly``.

Feeds live in the store, so ``list``, ``add`` and ``remove`` work whether or not
the daemon runs (a running daemon reads the store at every tick). ``poll`` and
``nightly`` go through the running daemon when one answers (so a retraction from a
feed reaches the live model at once, and the nightly run validates drift after);
with no daemon listening they do the store's part alone: edits are queued, and
retractions take effect at the daemon's next start. ``poll`` does that only under the
store's lock (:mod:`daemon.service.instance_lock`): see :func:`feeds_poll`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit

import click

from daemon.cli.app import CliError, EditdGroup, cli, config_option, echo_json, json_option, state
from daemon.cli.client import DaemonUnreachableError, call
from daemon.cli.edits import claim_store_offline, retract_in_store
from daemon.config import Config
from daemon.feeds.poller import FeedPoller
from store import feeds as feed_store
from store.db import Store


def _open(cfg: Config, *, create: bool = True) -> Store:
    return Store.open(cfg.store.path, create=create)


@cli.group(cls=EditdGroup)
def feeds() -> None:
    """Manage news and data feeds (RSS, Atom, JSON Feed)."""


@feeds.command(name="list")
@config_option
@json_option
@click.pass_context
def feeds_list(ctx: click.Context, as_json: bool) -> None:
    """List the feeds: URL, status, last error, items and edits."""
    with _open(state(ctx).config()) as st:
        rows = feed_store.feed_states(st)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no feeds (add one with: editd feeds add NAME URL)")
    for row in rows:
        click.echo(
            f"{row['name']}  {row['status']}  every {row['interval_s']:g}s  {row['url']}\n"
            f"    items {row['items']} (malformed {row['malformed']}), edits {row['edits']}"
            + (f"\n    last error: {row['last_error']}" if row["last_error"] else "")
        )


@feeds.command(name="add")
@config_option
@click.argument("name")
@click.argument("url")
@click.option(
    "--interval", type=float, default=None, help="Seconds between polls ([feeds] default)."
)
@click.option("--paused", is_flag=True, help="Add it without polling it yet.")
@click.pass_context
def feeds_add(
    ctx: click.Context, name: str, url: str, interval: float | None, paused: bool
) -> None:
    """Add a feed to poll (or change an existing one's URL or interval)."""
    cfg = state(ctx).config()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CliError(f"feed URL must be http(s)://host/..., got {url!r}")
    seconds = cfg.feeds.default_interval_s if interval is None else interval
    status = feed_store.FeedStatus.PAUSED if paused else feed_store.FeedStatus.ACTIVE
    try:
        with _open(cfg) as st:
            feed = feed_store.upsert_feed(st, name, url, interval_s=seconds, status=status)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    click.echo(f"{feed.name}: {feed.status} every {feed.interval_s:g}s: {feed.url}")


@feeds.command(name="remove")
@config_option
@click.argument("name")
@click.pass_context
def feeds_remove(ctx: click.Context, name: str) -> None:
    """Stop polling a feed and forget its items (the edits it made stay)."""
    with _open(state(ctx).config(), create=False) as st:
        if not feed_store.remove_feed(st, name):
            raise CliError(f"no feed named '{name}'")
    click.echo(f"{name}: removed")


@feeds.command(name="poll")
@config_option
@json_option
@click.argument("name", required=False)
@click.pass_context
def feeds_poll(ctx: click.Context, name: str | None, as_json: bool) -> None:
    """Poll one feed now (due or not), or every feed that is due.

    With the daemon running, it polls (through the API), so a retraction reaches the
    live model. With no daemon answering, the poll runs here against the store, under
    the store's lock; a daemon that runs but does not answer (another address, still
    binding) holds that lock: then nothing is fetched or written and the exit status is 1.
    \f
    The lock is held for the whole offline poll, network fetches included, rather than
    checked and released or taken around each write: the poll retracts edits in the
    store (not only adds, in transactions a running daemon picks up), so a daemon that
    started mid-poll and restored its model from the store would keep an edit retracted
    after that; and the poller counts a failed retraction as skipped and then marks the
    item seen, so a lock lost mid-poll would lose the retraction for good. The hold is
    bounded (per feed, [feeds] retries+1 attempts of about a minute at most each) and
    never makes a daemon wait: ``editd serve`` started meanwhile exits at once naming
    this pid and role (systemd's Restart=on-failure starts it again 5 s later), and once
    started it takes up what the poll wrote (queued edits, retractions) like any
    change made while it was down.
    """
    cfg = state(ctx).config()
    path = "/v1/feeds/poll" + ("" if name is None else f"?name={quote(name, safe='')}")
    try:
        reports: list[dict[str, Any]] = call(cfg, "POST", path)["polls"]
    except DaemonUnreachableError as unreachable:
        with (
            claim_store_offline(
                cfg.store.path,
                role="editd feeds poll",
                unreachable=unreachable,
                refusing="polling feeds behind a running daemon's back (their retractions "
                "would miss its model)",
            ),
            _open(cfg) as st,
        ):
            poller = FeedPoller(st, cfg, retract=lambda e, r: retract_in_store(st, e, r))
            polled = poller.poll_due() if name is None else [poller.poll(name)]
            reports = [report.to_json_dict() for report in polled]
    if as_json:
        echo_json(reports)
        return
    if not reports:
        click.echo("no feed is due")
    for r in reports:
        line = f"{r['feed']}: {r['outcome']}"
        if r["outcome"] == "ok":
            line += (
                f", {r['items']} items ({r['new']} new, {r['changed']} changed, "
                f"{r['malformed']} malformed), {len(r['edits'])} edits queued, "
                f"{len(r['retracted'])} retracted, {r['rejected']} rejected"
            )
        if r["error"]:
            line += f": {r['error']}"
        click.echo(line)


@cli.command()
@config_option
@json_option
@click.option(
    "--offline",
    is_flag=True,
    help="Do the store's part here even if a daemon runs (no drift validation).",
)
@click.pass_context
def nightly(ctx: click.Context, as_json: bool, offline: bool) -> None:
    """Run the nightly batch: release nightly edits and import the spool.

    With the daemon running it starts the daemon's nightly run (which also applies
    the edits and validates drift) and returns; otherwise it queues the edits in the
    store for the daemon's next start. This is what ``editd-nightly.timer`` runs.
    """
    from daemon.service.nightly import import_offline

    cfg = state(ctx).config()
    if not offline:
        try:
            body = call(cfg, "POST", "/v1/nightly")
            if as_json:
                echo_json(body)
            elif body["started"]:
                click.echo("nightly run started in the daemon (see editd status / the log)")
            else:
                click.echo("a nightly run is already in progress in the daemon")
            return
        except DaemonUnreachableError:
            pass
    with _open(cfg) as st:
        summary = import_offline(st, cfg, trigger="cli").to_json_dict()
    if as_json:
        echo_json(summary)
    else:
        click.echo(_summary_line(summary))


def _summary_line(summary: dict[str, Any]) -> str:
    keys = ("released", "accepted", "rejected", "duplicates")
    counts = ", ".join(f"{k} {summary.get(k, 0)}" for k in keys)
    return f"nightly (store only; the daemon applies the edits): {counts}"
