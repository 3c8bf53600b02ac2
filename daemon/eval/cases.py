"""Reading an edits file (editd request format, JSONL or a JSON array) into eval cases.

Requests are validated by the same rules as every other intake
(``store.records``); records that fail are counted and reported with their
line and field, never silently dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from daemon.editors.base import EditSpec
from daemon.errors import EditValidationError, EvalDataError
from daemon.eval.harness import EvalCase
from store.records import EditRequest, EditSource, SourceKind, iter_jsonl, parse_edit_request

EVAL_SOURCE = EditSource(kind=SourceKind.EVAL)


@dataclass(frozen=True)
class LoadedCases:
    """The cases that converted, and one error per record that did not."""

    cases: tuple[EvalCase, ...]
    errors: tuple[EditValidationError, ...]


def case_from_request(request: EditRequest, fallback_id: str) -> EvalCase:
    """An eval case from a validated request (``fallback_id`` when it has no ``id``)."""
    spec = EditSpec(
        edit_id=request.id or fallback_id,
        prompt=request.prompt,
        target=request.target,
        subject=request.subject,
        relation=request.relation,
    )
    return EvalCase(
        spec=spec,
        rephrases=request.rephrases,
        heldout=request.heldout_rephrases,
        locality=tuple((p.prompt, p.target) for p in request.locality),
        backend=request.backend,
        target_true=request.target_true,
    )


def load_cases(path: Path) -> LoadedCases:
    """Read ``path``: JSON Lines, or a JSON array of request objects (``.json``)."""
    if not path.is_file():
        raise EvalDataError("edits file not found", path=str(path))
    results: list[tuple[int, EditRequest | EditValidationError]]
    if path.suffix == ".json":
        results = _from_array(path)
    else:
        results = list(iter_jsonl(path, default_source=EVAL_SOURCE))
    cases: list[EvalCase] = []
    errors: list[EditValidationError] = []
    for number, item in results:
        if isinstance(item, EditValidationError):
            errors.append(item)
        else:
            cases.append(case_from_request(item, f"{path.stem}-{number:05d}"))
    return LoadedCases(tuple(cases), tuple(errors))


def _from_array(path: Path) -> list[tuple[int, EditRequest | EditValidationError]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalDataError(f"not a JSON document ({e})", path=str(path)) from e
    if not isinstance(data, list):
        raise EvalDataError("expected a JSON array of edit requests", path=str(path))
    out: list[tuple[int, EditRequest | EditValidationError]] = []
    for number, obj in enumerate(data, start=1):
        try:
            out.append((number, parse_edit_request(obj, default_source=EVAL_SOURCE)))
        except EditValidationError as e:
            out.append(
                (
                    number,
                    EditValidationError(e.reason, field=e.field, record=number, source=str(path)),
                )
            )
    return out
