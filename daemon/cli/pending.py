"""Verbs from DESIGN.md whose machinery is not built yet: they say so and exit 3."""

from __future__ import annotations

import click

from daemon.cli.app import EditdGroup, cli, config_option, echo_json, json_option, not_built, state

# --- verbs whose machinery arrives with later work --------------------------------------

DAEMON = "the daemon (worker, router, checkpoints, HTTP API)"


@cli.command()
@config_option
def serve() -> None:
    """Run the daemon: worker, scheduler and HTTP API."""
    not_built("serve", DAEMON)


@cli.command()
@config_option
def probe() -> None:
    """Score the drift probe set against the base model and the edited model."""
    not_built("probe", "drift validation in " + DAEMON)


@cli.group(cls=EditdGroup)
def checkpoint() -> None:
    """List, create and restore checkpoints of the editors' state."""


@checkpoint.command(name="list")
@config_option
@json_option
@click.pass_context
def checkpoint_list(ctx: click.Context, as_json: bool) -> None:
    """List recorded checkpoints, newest first."""
    from store.checkpoints import list_checkpoints
    from store.db import Store

    with Store.open(state(ctx).config().store.path, create=False) as st:
        rows = [c.to_json_dict() for c in list_checkpoints(st)]
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no checkpoints yet")
    for row in rows:
        click.echo(f"{row['id']}  {row['status']:5}  edits={row['edit_count']}  {row['path']}")


@checkpoint.command(name="create")
@config_option
def checkpoint_create() -> None:
    """Write a checkpoint of the running daemon's editor state now."""
    not_built("checkpoint create", DAEMON)


@checkpoint.command(name="restore")
@config_option
@click.argument("checkpoint_id")
def checkpoint_restore(checkpoint_id: str) -> None:
    """Restore the editors' state from a checkpoint and replay later edits."""
    not_built("checkpoint restore", DAEMON)


@cli.group(cls=EditdGroup)
def feeds() -> None:
    """Manage news and data feeds (RSS, Atom, JSON Feed)."""


FEEDS = "feed ingestion"


@feeds.command(name="list")
@config_option
def feeds_list() -> None:
    """List configured feeds and their state."""
    not_built("feeds list", FEEDS)


@feeds.command(name="add")
@config_option
@click.argument("name")
@click.argument("url")
def feeds_add(name: str, url: str) -> None:
    """Add a feed to poll."""
    not_built("feeds add", FEEDS)


@feeds.command(name="remove")
@config_option
@click.argument("name")
def feeds_remove(name: str) -> None:
    """Stop polling a feed."""
    not_built("feeds remove", FEEDS)


@feeds.command(name="poll")
@config_option
@click.argument("name", required=False)
def feeds_poll(name: str | None) -> None:
    """Poll one feed (or all) now."""
    not_built("feeds poll", FEEDS)
