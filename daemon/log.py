"""structlog, configured once per process.

Services write JSON lines (one event per line, easy for journald and log
shippers); a terminal gets coloured console rendering. Events are snake_case
past tense (``edit_applied``) with key/values (``edit_id``, ``batch_id``).
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

LogFormat = Literal["auto", "json", "console"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def resolve_format(fmt: LogFormat, stream: TextIO) -> Literal["json", "console"]:
    """``auto`` means console rendering on a TTY and JSON lines otherwise."""
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    return "console" if isatty is not None and isatty() else "json"


def _stdlib_logger_name(
    logger: object, method: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    """Name a stdlib record's logger under the key editd's own events use."""
    record = event_dict.get("_record")
    if record is not None:
        event_dict.setdefault("logger_name", record.name)
    return event_dict


def configure_logging(
    level: str = "info", fmt: LogFormat = "auto", stream: TextIO | None = None
) -> None:
    """Configure structlog for this process. Safe to call again (it replaces the config).

    editd's events and the stdlib records of libraries (uvicorn, transformers)
    leave through one handler, so each event is one whole line written under
    one lock: a JSON line can never be split by another thread's record, and
    in JSON format the libraries' records are JSON lines too.
    """
    out = stream if stream is not None else sys.stderr
    if level not in _LEVELS:
        raise ValueError(f"unknown log level '{level}' (expected one of {sorted(_LEVELS)})")
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: structlog.types.Processor
    if resolve_format(fmt, out) == "json":
        shared.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[_stdlib_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    logging.basicConfig(level=_LEVELS[level], handlers=[handler], force=True)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )


def adopt_transformers_logging() -> None:
    """Send transformers' records through the handler ``configure_logging`` set up.

    transformers gives its library logger a stderr handler of its own and stops
    propagation, so its warnings would be plain lines among the JSON ones. The
    daemon calls this once (importing transformers costs ~0.5 s, which the CLI's
    quick verbs need not pay).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """A lazy logger; ``name`` becomes the ``logger_name`` key on every event.

    Lazy (no ``.bind`` at import time) so that later configuration, and
    ``structlog.testing.capture_logs``, apply to module-level loggers too.
    """
    log: structlog.stdlib.BoundLogger = (
        structlog.get_logger(logger_name=name) if name else structlog.get_logger()
    )
    return log
