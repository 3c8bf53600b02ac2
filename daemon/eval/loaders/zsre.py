"""zsRE in the MEND / WISE format (``zsre_mend_edit.json``).

Record ``{subject, src, pred, rephrase, alt, answers, loc, loc_ans, cond, portability}``
becomes::

    id          "zsre-<N>" (N: the 1-based record number; the records carry no id)
    prompt      src                            target          " " + alt
    subject     subject, only when it occurs in src (else omitted and counted as
                ``subject_not_in_prompt``)
    rephrases   [rephrase]
    locality    [{prompt: loc without its "nq question: " prefix, target: " " + loc_ans}]

The ``nq question: `` prefix is MEND's marker that ``loc`` is a Natural Questions
question; it is not part of the question, so it is stripped (counted as
``nq_prefix_stripped``). ``pred`` (the BART base model's answer), ``answers`` (gold),
``cond`` and ``portability`` are not carried.
"""

from __future__ import annotations

from pathlib import Path

from daemon.eval.loaders.common import (
    Builder,
    Conversion,
    Converted,
    Record,
    has_keys,
    record_array,
)

NAME = "zsre"
KEYS = ("subject", "src", "rephrase", "alt", "loc", "loc_ans")
NQ_PREFIX = "nq question: "
FIELD_MAP = {
    "prompt": "src",
    "target": "alt",
    "subject": "subject",
    "rephrases": "rephrase",
    "locality.prompt": "loc",
    "locality.target": "loc_ans",
}


def matches(data: object) -> bool:
    """Whether the decoded file looks like MEND-format zsRE (first record's keys)."""
    return has_keys(data, KEYS)


def convert(path: Path, data: object, limit: int | None) -> Conversion:
    """Convert a decoded zsRE file (raises if its first record is of another schema)."""
    records = record_array(path, data, KEYS, NAME)
    return Builder(path, NAME, NAME, FIELD_MAP).run(records, limit, _record)


def _record(b: Builder, rec: Record) -> Converted:
    prompt = rec.text("src")
    loc = rec.text("loc")
    if loc.startswith(NQ_PREFIX):
        loc = loc.removeprefix(NQ_PREFIX)
        b.note("nq_prefix_stripped")
    request = b.request(
        str(rec.number),
        prompt=prompt,
        target=b.target(rec.text("alt")),
        subject=b.subject(prompt, rec.text("subject")),
        rephrases=[rec.text("rephrase")],
        locality=[{"prompt": loc, "target": b.target(rec.text("loc_ans"))}],
    )
    return [request], []
