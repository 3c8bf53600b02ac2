"""editd's durable store: SQLite (WAL) behind plain verbs.

The store is the source of truth: the queue of edit requests, the append-only
event log, batches, checkpoints, probe runs and feed state. Everything else
(editor state on disk) is a cache rebuildable from it.
"""
