"""What the HTTP API needs from the running daemon.

The API layer (``daemon.api.app``) only talks to a :class:`DaemonFacade`; the
service (``daemon.service.daemon``) implements it over the store, the worker and the
engine that owns the model. Keeping the contract here lets the API be tested
against any implementation and keeps FastAPI out of the service.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from typing import Any, Protocol

from daemon.engine.completions import CompletionChoice, CompletionDelta, CompletionRequest
from store.edits import EditRecord
from store.intake import EnqueueResult
from store.schema import EditKind, EditStatus


class DaemonFacade(Protocol):
    """The daemon as the API sees it. Methods raise editd errors (``EditdError``
    subclasses such as ``EditNotFoundError`` or ``InvalidTransitionError``) for
    bad requests; anything else is a server fault."""

    def submit(self, raws: Sequence[object]) -> list[EnqueueResult]:
        """Validate and enqueue API edit requests; invalid ones are stored as rejected."""
        ...

    def get_edit(self, edit_id: str) -> EditRecord:
        """One record; raises ``EditNotFoundError``."""
        ...

    def list_edits(
        self,
        status: EditStatus | None,
        limit: int,
        after: str | None,
        kind: EditKind | None = None,
    ) -> list[EditRecord]:
        """A page of records in queue order (of one ``status`` and ``kind`` when given);
        ``after`` is the last id of the previous page."""
        ...

    def retract(self, edit_id: str, reason: str) -> EditRecord:
        """Forget an edit (synchronously: when this returns, the model answers its
        prompt as the base model did). Raises ``EditNotFoundError`` or
        ``InvalidTransitionError`` (e.g. already retracted, or rejected)."""
        ...

    def complete(self, request: CompletionRequest) -> list[CompletionChoice]:
        """Continuations from the edited model, one choice per prompt, in order."""
        ...

    def stream(self, request: CompletionRequest) -> Generator[CompletionDelta, None, None]:
        """The same continuations token by token (their deltas join to :meth:`complete`'s
        choices). Iterate it in one thread; closing it stops generation at the next token
        and frees the model."""
        ...

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        """Chat messages (``{"role", "content"}``) as the model's prompt, through its chat
        template (or ``[api] chat_template``); raises ``ChatTemplateError``."""
        ...

    def model_name(self) -> str:
        """The served model's ``[model] name_or_path``."""
        ...

    def model_info(self) -> dict[str, Any]:
        """The served model and how far edits have come: ``name_or_path``, ``loaded_at``
        (Unix time or None), ``applied_edits``, ``applied_by_backend``, ``watermark`` (the
        edit log's newest event id)."""
        ...

    def status(self) -> dict[str, Any]:
        """Queue depth, applied counts per back-end, last checkpoint, last drift report."""
        ...

    def is_ready(self) -> bool:
        """True once the model is loaded and the worker runs."""
        ...

    def worker_problem(self) -> str | None:
        """Why the edit worker is unhealthy (dead or stuck), or ``None``."""
        ...

    def metrics_text(self) -> tuple[bytes, str]:
        """The Prometheus exposition (body, content type)."""
        ...

    def create_checkpoint(self) -> dict[str, Any]:
        """Write a checkpoint now (between batches); the registry record as JSON."""
        ...

    def run_drift_check(self) -> dict[str, Any]:
        """Score the drift probes now (rolling back on failure); the run as JSON.
        Raises ``EditdError`` when drift validation is disabled."""
        ...

    def restore_checkpoint(self, checkpoint_id: str) -> dict[str, Any]:
        """Load a checkpoint and replay the store's later edits; the restore report.
        Raises ``RecordNotFoundError`` or ``CheckpointError`` (corrupt, marked bad)."""
        ...

    def list_feeds(self) -> list[dict[str, Any]]:
        """Every feed with its state (status, last error, validators) and item counts."""
        ...

    def poll_feeds(self, name: str | None) -> list[dict[str, Any]]:
        """Poll one feed (due or not) or every due feed now; one report per feed polled.
        Raises ``RecordNotFoundError`` for an unknown feed."""
        ...

    def start_nightly(self, trigger: str) -> dict[str, Any]:
        """Start the nightly run (release nightly edits, import the spool, apply, validate
        drift) in the background; ``{"started": bool, "run": ...}``. A run already in
        progress is not started twice."""
        ...
