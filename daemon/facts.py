"""Facts as prompts: relations with templates, ``(subject, relation, object)`` facts, and
sets of them.

A template is a prompt that ends just before the object, with ``{subject}`` where the
subject goes (:func:`fill`); a fact's ``target`` is its object with a leading space, as
edit targets are. A :class:`FactSet` is what locate, the gate floor and the drift
probes read: a fact world's facts (:mod:`daemon.world`) or the shipped common facts
(:mod:`daemon.drift.commonfacts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

SUBJECT_SLOT = "{subject}"
"""Where a template takes its subject."""


@dataclass(frozen=True)
class Relation:
    """A relation from subjects of one entity type to objects of another."""

    name: str
    subject_type: str
    object_type: str
    train_templates: tuple[str, ...]
    heldout_templates: tuple[str, ...]


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) triple; ``target`` is the object with a leading space."""

    subject: str
    relation: str
    object: str

    @property
    def target(self) -> str:
        return " " + self.object


class FactSet(Protocol):
    """Labelled facts under templates: a fact world, or the shipped common facts."""

    @property
    def relations(self) -> tuple[Relation, ...]: ...

    @property
    def facts(self) -> tuple[Fact, ...]: ...

    def relation(self, name: str) -> Relation: ...


def fill(template: str, subject: str) -> str:
    """``template`` with its subject slot filled."""
    return template.replace(SUBJECT_SLOT, subject)
