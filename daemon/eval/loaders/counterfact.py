"""CounterFact in the MEND/EasyEdit edit format (``counterfact-edit.json``, ``-val.json``).

Record ``{case_id, prompt, subject, target_new, ground_truth, rephrase_prompt,
locality_prompt, locality_ground_truth}`` (all strings but ``case_id``) becomes::

    id          "counterfact-<case_id>"        source.item_id  "<case_id>"
    prompt      prompt                         target          " " + target_new
    subject     subject (omitted, and counted as ``subject_not_in_prompt``, if not in prompt)
    rephrases   [rephrase_prompt]
    locality    [{prompt: locality_prompt, target: " " + locality_ground_truth}]

    target_true " " + ground_truth (the answer the edit replaces: ES / PS / NS)

Targets get exactly one leading
space (outer whitespace of the source text is dropped and counted as ``whitespace_trimmed``).
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

NAME = "counterfact"
KEYS = (
    "case_id",
    "prompt",
    "subject",
    "target_new",
    "rephrase_prompt",
    "locality_prompt",
    "locality_ground_truth",
)
FIELD_MAP = {
    "id": "case_id",
    "prompt": "prompt",
    "target": "target_new",
    "subject": "subject",
    "rephrases": "rephrase_prompt",
    "locality.prompt": "locality_prompt",
    "locality.target": "locality_ground_truth",
    "target_true": "ground_truth",
}


def matches(data: object) -> bool:
    """Whether the decoded file looks like CounterFact (first record's keys)."""
    return has_keys(data, KEYS)


def convert(path: Path, data: object, limit: int | None) -> Conversion:
    """Convert a decoded CounterFact file (raises if its first record is of another schema)."""
    records = record_array(path, data, KEYS, NAME)
    return Builder(path, NAME, NAME, FIELD_MAP).run(records, limit, _record)


def _record(b: Builder, rec: Record) -> Converted:
    case_id = rec.integer("case_id")
    prompt = rec.text("prompt")
    request = b.request(
        str(case_id),
        prompt=prompt,
        target=b.target(rec.text("target_new")),
        subject=b.subject(prompt, rec.text("subject")),
        rephrases=[rec.text("rephrase_prompt")],
        target_true=b.target(rec.text("ground_truth")),
        locality=[
            {
                "prompt": rec.text("locality_prompt"),
                "target": b.target(rec.text("locality_ground_truth")),
            }
        ],
    )
    return [request], []
