"""editd's durable store: SQLite (WAL) behind plain verbs.

The store is the source of truth: the queue of edit requests, the append-only
event log, batches, checkpoints, probe runs and feed state. Everything else
(editor state on disk) is a cache rebuildable from it.

Entry points: :class:`store.db.Store` (open, transactions), :class:`store.queue.EditQueue`
(the durable queue), :mod:`store.records` (the edit request schema and validation),
:mod:`store.editlog` (the event log), and the small registries :mod:`store.batches`,
:mod:`store.checkpoints`, :mod:`store.probes`, :mod:`store.feeds`.
"""
