"""MQuAKE (``MQuAKE-hard.json``; the MQuAKE-CF schema): edits plus multi-hop probes.

Each case ``{case_id, requested_rewrite: [...], questions, answer, answer_alias,
new_answer, new_answer_alias, ...}`` yields one request per rewrite (K = 1, 2, ...)::

    id          "mquake-<case_id>-<K>"         source.item_id  "<case_id>"
    prompt      rewrite.prompt with its "{}" replaced by rewrite.subject
    target      " " + rewrite.target_new.str   subject   rewrite.subject
    relation    rewrite.relation_id (e.g. "P175"), when present
    rephrases   [rewrite.question] when present (the fact asked as a question)

and one :class:`MultiHopProbe` per multi-hop question (``mquake-<case_id>-q<J>``):
prompt = the question, answers = (new_answer, *new_answer_alias), old_answers =
(answer, *answer_alias), edit_ids = the case's request ids. The probes do not fit the
request schema (no subject, several acceptable answers); score them after all of a case's
edits are applied. A case converts all or nothing (one error per broken case).

The template must hold ``{}`` exactly once; it is filled by replacement rather than
``str.format`` so that other braces in a prompt cannot break it. Across cases MQuAKE
repeats rewrites: a request whose prompt and target equal an earlier case's is counted as
``duplicate_rewrite``, one whose prompt equals an earlier case's with another target as
``conflicting_rewrite``; both are still emitted (each case keeps its own edits).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from daemon.eval.loaders.common import (
    Builder,
    Conversion,
    Converted,
    MultiHopProbe,
    Record,
    has_keys,
    record_array,
)

NAME = "mquake"
KEYS = ("case_id", "requested_rewrite", "questions", "new_answer")
FIELD_MAP = {
    "id": "case_id",
    "prompt": "requested_rewrite.prompt",
    "target": "requested_rewrite.target_new.str",
    "subject": "requested_rewrite.subject",
    "relation": "requested_rewrite.relation_id",
    "rephrases": "requested_rewrite.question",
}


def matches(data: object) -> bool:
    """Whether the decoded file looks like MQuAKE (first record's keys)."""
    return has_keys(data, KEYS)


def convert(path: Path, data: object, limit: int | None) -> Conversion:
    """Convert a decoded MQuAKE file (raises if its first record is of another schema)."""
    records = record_array(path, data, KEYS, NAME)
    result = Builder(path, NAME, NAME, FIELD_MAP).run(records, limit, _case)
    targets: dict[str, str] = {}
    notes = dict(result.notes)
    for request in result.requests:
        prompt, target = request["prompt"], request["target"]
        if prompt not in targets:
            targets[prompt] = target
            continue
        key = "duplicate_rewrite" if targets[prompt] == target else "conflicting_rewrite"
        notes[key] = notes.get(key, 0) + 1
    return dataclasses.replace(result, notes=notes)


def _case(b: Builder, rec: Record) -> Converted:
    case_id = rec.integer("case_id")
    rewrites = rec.array("requested_rewrite")
    if not rewrites:
        raise rec.error("requested_rewrite", "must not be empty")
    requests = [
        _rewrite(b, rec.child(f"requested_rewrite[{i}]", raw), f"{case_id}-{i + 1}", str(case_id))
        for i, raw in enumerate(rewrites)
    ]
    edit_ids = tuple(str(r["id"]) for r in requests)
    answers = (_answer(rec, "new_answer"), *rec.texts("new_answer_alias"))
    old = (_answer(rec, "answer"), *rec.texts("answer_alias")) if "answer" in rec.raw else ()
    questions = rec.texts("questions")
    if not questions:
        raise rec.error("questions", "must hold at least one question")
    probes = [
        MultiHopProbe(f"{NAME}-{case_id}-q{j}", q, answers, old, edit_ids)
        for j, q in enumerate(questions, start=1)
    ]
    return requests, probes


def _rewrite(b: Builder, rw: Record, key: str, item_id: str) -> dict[str, Any]:
    template, subject = rw.text("prompt"), rw.text("subject")
    if template.count("{}") != 1:
        raise rw.error("prompt", "must hold '{}' (the subject's place) exactly once")
    prompt = template.replace("{}", subject)
    question = rw.optional_text("question")
    return b.request(
        key,
        item_id,
        prompt=prompt,
        target=b.target(rw.child("target_new", rw.get("target_new")).text("str")),
        subject=b.subject(prompt, subject),
        relation=rw.optional_text("relation_id"),
        rephrases=[question] if question is not None else [],
    )


def _answer(rec: Record, name: str) -> str:
    answer = rec.text(name)
    if not answer.strip():
        raise rec.error(name, "must not be blank")
    return answer
