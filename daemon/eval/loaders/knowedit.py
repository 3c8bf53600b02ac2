"""KnowEdit (Zhang et al. 2024) benchmark files, one sub-set per file, told apart by content.

Every request gets ``id`` ``"knowedit-<subset>[-<split>]-<N>"`` (N: the 1-based record
number; ``split`` is ``train``/``test``/``val`` when the file name says so, so that the
train and test files of one sub-set do not share ids) and ``source.url``
``"knowedit/<subset>"``. Targets get one leading space (``" " + text.strip()``).

Prompt-shaped sub-sets, ``{subject, prompt, target_new, [ground_truth], [rephrase_prompt],
locality, portability}``:

- ``zsre`` (ZsRE-test-all; has ``rephrase_prompt``; ``ground_truth`` is a list),
- ``wiki_counterfact`` (WikiData_counterfact; ``ground_truth`` a string, no rephrase),
- ``wiki_recent`` (WikiData_recent; no ``ground_truth``; locality answers are alias lists).

  prompt ← prompt; target ← " " + target_new; subject ← subject (omitted and counted as
  ``subject_not_in_prompt`` when not in the prompt); rephrases ← [rephrase_prompt] when
  present; locality ← every ``{prompt, ground_truth}`` item of every group of the
  ``locality`` object (``Relation_Specificity``, ``Forgetfulness``, ...), in file order,
  with target " " + the first answer (the first string of a string / list / list of alias
  lists; an item whose answer is empty or blank is skipped, counted as
  ``locality_without_answer``;
  past 64 probes the rest are dropped, counted as ``locality_truncated``).
  ``ground_truth`` and ``portability`` (multi-hop / alias probes) are not carried.

``wikibio`` (WikiBio long-form hallucination editing), ``{text, labels, concept, locality}``:
  prompt ← text; target ← " " + labels (a sentence, within the 1,000-character target
  limit); subject ← concept (the text opens "This is a Wikipedia passage about <concept>.");
  locality as above.

``trivia`` (Sanitation, trivia_qa): a top-level object, ``{success: [...], locality: [...]}``
(test) or ``{K_F: [...], K_R: [...]}`` (train). The edit list (``success`` / ``K_F``) is
converted: prompt ← question; target ← " " + target_new ("I don't know."); subject ← subject
(train only). Records are numbered within the edit list and fields named ``K_F.question``.
The retain list (``locality`` / ``K_R``: questions whose answer must stay) holds no paired
edits; it is not converted and its length is counted as ``retain_records_not_converted``.
"""

from __future__ import annotations

from pathlib import Path

from daemon.errors import EvalDataError
from daemon.eval.loaders.common import (
    MAX_LIST_ITEMS,
    Builder,
    Conversion,
    Converted,
    Record,
    kind,
    record_array,
)

NAME = "knowedit"
PROMPT_KEYS = ("prompt", "subject", "target_new", "locality")
WIKIBIO_KEYS = ("text", "labels", "concept", "locality")
TRIVIA_LISTS = (("success", "locality"), ("K_F", "K_R"))
FIELD_MAPS = {
    "prompt": {
        "prompt": "prompt",
        "target": "target_new",
        "subject": "subject",
        "rephrases": "rephrase_prompt",
        "locality": "locality",
    },
    "wikibio": {"prompt": "text", "target": "labels", "subject": "concept", "locality": "locality"},
    "trivia": {"prompt": "question", "target": "target_new", "subject": "subject"},
}


def matches(data: object) -> bool:
    """Whether the decoded file looks like one of the supported KnowEdit sub-sets."""
    try:
        subset_of(Path("-"), data)
    except EvalDataError:
        return False
    return True


def subset_of(path: Path, data: object) -> str:
    """``zsre``, ``wiki_counterfact``, ``wiki_recent``, ``wikibio`` or ``trivia``; else raise."""
    if isinstance(data, dict):
        if any(edits in data and retain in data for edits, retain in TRIVIA_LISTS):
            return "trivia"
        found = ", ".join(sorted(data)) or "none"
        raise EvalDataError(
            "not a KnowEdit file: a top-level object must hold 'success' and 'locality' "
            f"or 'K_F' and 'K_R' lists (keys: {found})",
            path=str(path),
        )
    first = Record(path, 1, record_array(path, data, (), NAME)[0]).raw
    if "text" in first or "concept" in first:
        record_array(path, data, WIKIBIO_KEYS, f"{NAME} (WikiBio)")
        return "wikibio"
    record_array(path, data, PROMPT_KEYS, NAME)
    if "rephrase_prompt" in first:
        return "zsre"
    return "wiki_counterfact" if "ground_truth" in first else "wiki_recent"


def convert(path: Path, data: object, limit: int | None) -> Conversion:
    """Convert a decoded KnowEdit file of any supported sub-set."""
    subset = subset_of(path, data)
    split = next((s for s in ("train", "test", "val") if s in path.stem.lower()), None)
    prefix = f"{NAME}-{subset}" + (f"-{split}" if split else "")
    shape = subset if subset in FIELD_MAPS else "prompt"
    b = Builder(path, f"{NAME}/{subset}", prefix, FIELD_MAPS[shape])
    if isinstance(data, dict):
        return _trivia(b, data, limit)
    records = record_array(path, data, (), NAME)
    return b.run(records, limit, _wikibio if shape == "wikibio" else _prompt_record)


def _prompt_record(b: Builder, rec: Record) -> Converted:
    prompt = rec.text("prompt")
    rephrase = rec.optional_text("rephrase_prompt")
    request = b.request(
        str(rec.number),
        prompt=prompt,
        target=b.target(rec.text("target_new")),
        subject=b.subject(prompt, rec.text("subject")),
        rephrases=[rephrase] if rephrase is not None else [],
        locality=_locality(b, rec),
    )
    return [request], []


def _wikibio(b: Builder, rec: Record) -> Converted:
    prompt = rec.text("text")
    request = b.request(
        str(rec.number),
        prompt=prompt,
        target=b.target(rec.text("labels")),
        subject=b.subject(prompt, rec.text("concept")),
        locality=_locality(b, rec),
    )
    return [request], []


def _locality(b: Builder, rec: Record) -> list[dict[str, str]]:
    if rec.raw.get("locality") is None:
        return []
    probes = []
    for group, items in rec.mapping("locality").items():
        if not isinstance(items, list):
            raise rec.error(f"locality.{group}", f"must be an array, got {kind(items)}")
        for i, item in enumerate(items):
            probe = rec.child(f"locality.{group}[{i}]", item)
            answer = probe.first_text("ground_truth")
            if answer is None or not answer.strip():
                b.note("locality_without_answer")
                continue
            probes.append({"prompt": probe.text("prompt"), "target": b.target(answer)})
    if len(probes) > MAX_LIST_ITEMS:
        b.note("locality_truncated", len(probes) - MAX_LIST_ITEMS)
    return probes[:MAX_LIST_ITEMS]


def _trivia(b: Builder, data: dict[str, object], limit: int | None) -> Conversion:
    edits, retain = next((e, r) for e, r in TRIVIA_LISTS if e in data and r in data)
    items, retained = _array(b.path, data, edits), _array(b.path, data, retain)
    if retained:
        b.notes["retain_records_not_converted"] = len(retained)
    return b.run(items, limit, _trivia_record, prefix=f"{edits}.")


def _array(path: Path, data: dict[str, object], name: str) -> list[object]:
    value = data[name]
    if not isinstance(value, list):
        raise EvalDataError(f"must be an array, got {kind(value)}", path=str(path), field=name)
    return value


def _trivia_record(b: Builder, rec: Record) -> Converted:
    prompt = rec.text("question")
    request = b.request(
        str(rec.number),
        prompt=prompt,
        target=b.target(rec.text("target_new")),
        subject=b.subject(prompt, rec.optional_text("subject")),
    )
    return [request], []
