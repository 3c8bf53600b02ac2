"""Logging: one line per event, whichever thread or library wrote it."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest
import structlog

from daemon.log import adopt_transformers_logging, configure_logging, get_logger


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    from transformers.utils import logging as hf_logging

    yield
    structlog.reset_defaults()
    logging.basicConfig(handlers=[logging.NullHandler()], force=True)
    hf_logging.disable_propagation()
    hf_logging.enable_default_handler()


def test_threads_and_libraries_never_split_a_json_line(tmp_path: Path) -> None:
    """The daemon's events and uvicorn's records share stderr; under load from
    several threads every line must still be one whole JSON object."""
    path = tmp_path / "serve.log"
    with path.open("w", buffering=1) as out:
        configure_logging("info", "json", out)
        log = get_logger("editd.test")
        stdlib = logging.getLogger("uvicorn.error")
        start = threading.Barrier(6)

        def ours(n: int) -> None:
            start.wait()
            for i in range(400):
                log.info("edit_applied", worker=n, i=i)

        def theirs(n: int) -> None:
            start.wait()
            for i in range(400):
                stdlib.info("request %d from %d", i, n)

        threads = [threading.Thread(target=f, args=(n,)) for n in range(3) for f in (ours, theirs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(events) == 6 * 400
    assert sum(e["logger_name"] == "uvicorn.error" for e in events) == 3 * 400
    assert sum(e["event"] == "edit_applied" for e in events) == 3 * 400
    assert all(e["level"] == "info" and "timestamp" in e for e in events)


def test_level_filters_both_kinds_and_exceptions_are_structured(tmp_path: Path) -> None:
    path = tmp_path / "serve.log"
    with path.open("w", buffering=1) as out:
        configure_logging("warning", "json", out)
        adopt_transformers_logging()  # transformers has a handler of its own otherwise
        log = get_logger("editd.test")
        log.info("quiet")
        logging.getLogger("transformers").info("quiet too")
        logging.getLogger("transformers").warning("loud %s", "library")
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            log.exception("failed", edit_id="e1")
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["event"] for e in events] == ["loud library", "failed"]
    assert events[0]["logger_name"] == "transformers" and events[0]["level"] == "warning"
    assert events[1]["edit_id"] == "e1"
    assert events[1]["exception"][0]["exc_type"] == "ZeroDivisionError"


def test_console_format_names_the_logger(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    with path.open("w") as out:
        configure_logging("info", "console", out)
        get_logger("editd.scheduler").info("drift_checked", failures=0)
        logging.getLogger("uvicorn.error").info("Started")
    text = path.read_text()
    assert "drift_checked" in text and "[editd.scheduler]" in text and "failures=0" in text
    assert "Started" in text and "[uvicorn.error]" in text
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("loud", "json", out)
