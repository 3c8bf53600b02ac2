"""A queue worker run as a separate process by test_processes.py.

Usage: python _worker.py DB NAME READY_FILE GO_FILE OUT_FILE LEASE_S BATCH WORK_S

Writes READY_FILE once the store is open, waits for GO_FILE, then claims and
acks until the queue is empty, appending each acked id to OUT_FILE.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from pathlib import Path

import structlog

from daemon.errors import LeaseLostError
from store.db import Store
from store.queue import EditQueue, QueuePolicy


def main(argv: list[str]) -> int:
    db, name, ready, go, out = argv[:5]
    lease_s, batch, work_s = float(argv[5]), int(argv[6]), float(argv[7])
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    policy = QueuePolicy(max_attempts=1000, backoff_base_s=0.01, backoff_max_s=0.05)
    with Store.open(db, create=False) as store, Path(out).open("a") as acked:
        queue = EditQueue(store, policy)
        Path(ready).touch()
        while not Path(go).exists():
            time.sleep(0.005)
        while True:
            claimed = queue.claim(batch, lease_s, name)
            if not claimed:
                if queue.depth() == 0:
                    return 0
                time.sleep(0.01)
                continue
            for record in claimed:
                time.sleep(random.uniform(0, work_s))  # "applying" the edit
                try:
                    queue.ack(record.id, name, backend="melo")
                except LeaseLostError:
                    continue
                acked.write(record.id + "\n")
                acked.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
