"""The ``noop`` editor: accepts every edit and changes nothing.

It measures the unedited model under the same harness: efficacy ~0 on
counterfactual edits and locality 1.0 by construction. Any other reading
points at the harness, not the editor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from daemon.editors.base import EditOutcome, EditSpec

STATE_VERSION = 1


class NoopEditor:
    """Records edit ids; the model is never touched."""

    name = "noop"
    reads_subjects = False

    def __init__(self) -> None:
        self._applied: list[str] = []

    def apply(self, edits: Sequence[EditSpec]) -> list[EditOutcome]:
        self._applied.extend(e.edit_id for e in edits)
        return [EditOutcome(e.edit_id, accepted=True) for e in edits]

    def retract(self, edit_ids: Sequence[str]) -> None:
        gone = set(edit_ids)
        self._applied = [i for i in self._applied if i not in gone]

    def applied_ids(self) -> list[str]:
        return list(self._applied)

    def routing(self, prompts: Sequence[str]) -> AbstractContextManager[None]:
        return nullcontext()

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "editor": self.name, "applied": list(self._applied)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or state.get("editor") != self.name:
            raise ValueError(f"not a noop editor state of version {STATE_VERSION}")
        self._applied = [str(i) for i in state["applied"]]
