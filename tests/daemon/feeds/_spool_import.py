"""One spool import in its own process, for test_spool_crash.py (which kills it).

Usage: python -m tests.daemon.feeds._spool_import DB SPOOL_DIR READY_FILE [PAUSE_S [CHUNK]]

Opens the store, creates READY_FILE, imports the spool once and exits 0 (3 if a
file was skipped). PAUSE_S sleeps before and after each file's move, widening the
windows a kill must hit to test recovery: committed but not moved, and moved but
not yet marked done. CHUNK is the number of lines per write transaction.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import structlog

import daemon.feeds.spool
from daemon.feeds.spool import import_spool
from store.db import Store
from store.schema import RequestLimits


def main(argv: list[str]) -> int:
    db, spool_dir, ready = argv[:3]
    pause_s = float(argv[3]) if len(argv) > 3 else 0.0
    chunk_lines = int(argv[4]) if len(argv) > 4 else daemon.feeds.spool.CHUNK_LINES
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    if pause_s > 0:
        move = daemon.feeds.spool._move

        def slow_move(src: Path, dest: Path) -> None:
            time.sleep(pause_s)
            move(src, dest)
            time.sleep(pause_s)

        daemon.feeds.spool._move = slow_move
    with Store.open(db, create=False) as store:
        Path(ready).touch()
        result = import_spool(
            store,
            Path(spool_dir),
            limits=RequestLimits(),
            max_file_bytes=1 << 30,
            chunk_lines=chunk_lines,
        )
    return 0 if not result.skipped else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
