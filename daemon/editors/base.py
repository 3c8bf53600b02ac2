"""What every editor is: the protocol the harness, the worker and the back-ends share.

An editor owns a live model and changes what it answers. It receives only
what a client would send (``EditSpec``: prompt, target, subject, relation and,
when the caller allows it, training-template rephrases; and how far the edit may
reach, ``Reach``) and must be able to:

- ``apply`` a batch of edits, reporting per edit whether it was accepted;
- ``retract`` edits so those prompts are answered as the base model did;
- give its full state as ``state_dict`` (with a ``"version"`` key) and take it
  back with ``load_state_dict``, so checkpoints round-trip;
- ``routing(prompts)``: a context manager inside which forward passes and
  generation over exactly those prompts (one row each, in order) use the
  editor's per-request routing. Editors without routing return a null context.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

Reach = Literal["subject", "prompt"]
"""How far an edit may reach beyond its own prompts. ``"subject"``: wherever its
subject is named (an editor keyed at subjects routes every prompt about it to the
edit: what a fact update wants). ``"prompt"``: its prompts and close phrasings of
them only; other questions about the subject keep the base model's answers (what a
``forget`` of one question about a person wants). Editors that cannot tell the two
apart treat both as ``"subject"`` and say so in their docs."""


@dataclass(frozen=True)
class EditSpec:
    """One edit as an editor sees it."""

    edit_id: str
    prompt: str
    target: str
    subject: str | None = None
    relation: str | None = None
    rephrases: tuple[str, ...] = ()
    reach: Reach = "subject"
    # the target is the whole reply (a withheld answer): an editor that can teaches the
    # model to end after it, so a short answer is not repeated for the rest of the reply
    whole_reply: bool = False

    def __post_init__(self) -> None:
        if not self.edit_id:
            raise ValueError("edit_id must not be empty")
        if not self.prompt.strip() or not self.target.strip():
            raise ValueError(f"edit {self.edit_id}: prompt and target must not be empty")
        if self.subject is not None and self.subject not in self.prompt:
            raise ValueError(f"edit {self.edit_id}: subject {self.subject!r} not in prompt")
        if self.reach not in ("subject", "prompt"):
            raise ValueError(f"edit {self.edit_id}: reach must be 'subject' or 'prompt'")


@dataclass(frozen=True)
class EditOutcome:
    """What happened to one edit of a batch. ``reason`` explains a refusal."""

    edit_id: str
    accepted: bool
    reason: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Editor(Protocol):
    """A knowledge editor bound to one live model."""

    name: str

    @property
    def reads_subjects(self) -> bool:
        """Whether an edit acts on any prompt that names its subject, not only on prompts
        worded like the edit's own (the router sends facts by it)."""
        ...

    def apply(self, edits: Sequence[EditSpec]) -> list[EditOutcome]:
        """Apply a batch; one outcome per edit, in order. Refused edits leave no trace."""
        ...

    def retract(self, edit_ids: Sequence[str]) -> None:
        """Undo these edits: their prompts are answered as by the base model."""
        ...

    def applied_ids(self) -> list[str]:
        """Ids of the edits currently in effect, in the order they were applied."""
        ...

    def routing(self, prompts: Sequence[str]) -> AbstractContextManager[None]:
        """Per-request routing for a forward/generation over exactly these prompts."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The editor's whole state, with a ``"version"`` key."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state produced by ``state_dict`` (refusing unknown versions)."""
        ...
