"""The ``editd`` command.

Every verb from DESIGN.md is listed in ``editd --help``. Verbs whose machinery
is not built yet say so and exit with status 3 — never a fake success. Errors
editd raises on purpose print one line (``editd: error: ...``) and exit 1;
usage errors exit 2 (click's convention).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import click

from daemon import __version__
from daemon.config import Config, load_config
from daemon.errors import EditdError, NotBuiltYetError
from daemon.log import configure_logging

F = TypeVar("F", bound=Callable[..., Any])

EXIT_ERROR = 1
EXIT_NOT_BUILT = 3


class CliError(click.ClickException):
    """A one-line error for the terminal with a chosen exit code."""

    exit_code = EXIT_ERROR

    def show(self, file: Any = None) -> None:
        click.echo(f"editd: error: {self.format_message()}", err=True, file=file)


class CliNotBuiltError(CliError):
    """A verb whose machinery is not built yet: exit status 3."""

    exit_code = EXIT_NOT_BUILT


class EditdGroup(click.Group):
    """Turns editd's own exceptions into one-line errors with the right exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NotBuiltYetError as e:
            raise CliNotBuiltError(str(e)) from e
        except EditdError as e:
            raise CliError(str(e)) from e


@dataclass
class CliState:
    """What the commands share: the chosen config file, loaded on first use."""

    config_path: str | None = None
    _config: Config | None = field(default=None, repr=False)

    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
            configure_logging(self._config.log.level, self._config.log.format)
        return self._config


def _remember_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.ensure_object(CliState).config_path = value


def config_option(func: F) -> F:
    """``--config PATH`` on every command (default ./config.toml, env EDITD_CONFIG)."""
    option = click.option(
        "--config",
        type=click.Path(dir_okay=False),
        expose_value=False,
        is_eager=True,
        callback=_remember_config,
        help="Config file (default: ./config.toml, or $EDITD_CONFIG).",
    )
    return option(func)


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")(
        func
    )


def state(ctx: click.Context) -> CliState:
    return ctx.ensure_object(CliState)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False))


def not_built(verb: str, arrives_with: str) -> NoReturn:
    raise NotBuiltYetError(f"'editd {verb}' is not built yet (it arrives with {arrives_with})")


@click.group(cls=EditdGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="editd")
@config_option
@click.pass_context
def cli(ctx: click.Context) -> None:
    """editd: keep a deployed language model's facts current without retraining."""
    ctx.ensure_object(CliState)


# --- verbs whose machinery arrives with later work --------------------------------------

DAEMON = "the daemon (worker, router, checkpoints, HTTP API)"


@cli.command()
@config_option
def serve() -> None:
    """Run the daemon: worker, scheduler and HTTP API."""
    not_built("serve", DAEMON)


@cli.command()
@config_option
def locate() -> None:
    """Find where the model recalls facts (layers, key position) for the hook back-end."""
    not_built("locate", "the COMEBA-HK hook back-end")


@cli.command()
@config_option
def probe() -> None:
    """Score the drift probe set against the base model and the edited model."""
    not_built("probe", "drift validation in " + DAEMON)


@cli.command(name="eval", context_settings={"ignore_unknown_options": True})
@config_option
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def eval_(args: tuple[str, ...]) -> None:
    """Run a stream of edits through an editor and score lifelong-editing metrics."""
    not_built("eval", "the evaluation harness")


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


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="editd")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
