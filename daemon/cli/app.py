"""The ``editd`` command group, shared options and error handling.

Every verb in ``docs/contracts.md`` ("The CLI verbs") is listed in ``editd --help``,
plus ``nightly``. An ``EditdError`` that says something is not built exits 3, never a
fake success. Errors editd raises on purpose print one line (``editd: error: ...``)
and exit 1; usage errors exit 2 (click's convention).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

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
    verbose: bool = False
    _config: Config | None = field(default=None, repr=False)

    def config(self) -> Config:
        """Load the config once; one-shot verbs log warnings only unless ``--verbose``."""
        if self._config is None:
            self._config = load_config(self.config_path)
            level = self._config.log.level
            if not self.verbose and level in ("debug", "info"):
                level = "warning"
            configure_logging(level, self._config.log.format)
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


@click.group(cls=EditdGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="editd")
@config_option
@click.option("-v", "--verbose", is_flag=True, help="Log info events (JSON lines) to stderr.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """editd: keep a deployed language model's facts current without retraining."""
    ctx.ensure_object(CliState).verbose = verbose
