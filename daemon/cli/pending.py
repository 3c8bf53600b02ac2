"""Verbs from DESIGN.md whose machinery is not built yet: they say so and exit 3."""

from __future__ import annotations

import click

from daemon.cli.app import EditdGroup, cli, config_option, not_built

# --- verbs whose machinery arrives with later work --------------------------------------


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
