"""Converters from public knowledge-editing benchmarks into editd edit requests.

Supported formats (see each module's docstring for the field mapping):

- ``counterfact`` (:mod:`.counterfact`): CounterFact, MEND/EasyEdit edit and val files;
- ``zsre`` (:mod:`.zsre`): zsRE in the MEND / WISE format;
- ``knowedit`` (:mod:`.knowedit`): KnowEdit's ZsRE, WikiData_counterfact, WikiData_recent,
  WikiBio and trivia (Sanitation) files;
- ``mquake`` (:mod:`.mquake`): MQuAKE(-hard); its multi-hop questions come back as
  :class:`MultiHopProbe` objects in :attr:`Conversion.probes`.

Input is a JSON file holding an array of records (KnowEdit trivia: an object of two
arrays), or a ``.jsonl`` file with one record per line. Every request in
:attr:`Conversion.requests` has passed :func:`store.records.parse_edit_request` and is its
canonical JSON dict, with ``source = {"kind": "eval", "url": <dataset>, "item_id": <id>}``.
Whole-file problems raise :class:`~daemon.errors.EvalDataError`; a record that cannot be
converted becomes one ``EvalDataError`` in :attr:`Conversion.errors` (file, 1-based
record number, source field, reason) and is never silently dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from daemon.errors import EvalDataError
from daemon.eval.loaders import counterfact, knowedit, mquake, zsre
from daemon.eval.loaders.common import Conversion, MultiHopProbe, kind, read_json

__all__ = ["FORMATS", "Conversion", "MultiHopProbe", "convert", "detect_format", "write_jsonl"]

FORMATS = ("counterfact", "zsre", "knowedit", "mquake")
_MODULES: dict[str, ModuleType] = {
    "counterfact": counterfact,
    "zsre": zsre,
    "knowedit": knowedit,
    "mquake": mquake,
}


def detect_format(path: Path) -> str:
    """The format of ``path`` (one of :data:`FORMATS`), from its first record's keys."""
    return _detect(path, read_json(path))


def convert(path: Path, fmt: str = "auto", *, limit: int | None = None) -> Conversion:
    """Convert the benchmark file ``path`` (its first ``limit`` records when given).

    ``fmt`` is one of :data:`FORMATS`, or ``"auto"`` to detect it from the content.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise EvalDataError(
            f"unknown format {fmt!r}; expected 'auto' or one of {', '.join(FORMATS)}",
            path=str(path),
        )
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    data = read_json(path)
    name = _detect(path, data) if fmt == "auto" else fmt
    result: Conversion = _MODULES[name].convert(path, data, limit)
    return result


def write_jsonl(path: Path, requests: Iterable[Mapping[str, Any]]) -> int:
    """Write ``requests`` as JSON Lines (UTF-8), atomically; the number written."""
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8", newline="\n") as out:
            for request in requests:
                out.write(json.dumps(dict(request), ensure_ascii=False) + "\n")
                count += 1
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise EvalDataError(f"cannot write: {exc.strerror or exc}", path=str(path)) from exc
    return count


def _detect(path: Path, data: object) -> str:
    for name in ("mquake", "counterfact", "zsre", "knowedit"):
        if _MODULES[name].matches(data):
            return name
    record: int | None = None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        record, what = 1, f"its keys are {', '.join(sorted(data[0])) or 'none'}"
    elif isinstance(data, list):
        record, what = (1, f"it is {kind(data[0])}") if data else (None, "the array is empty")
    elif isinstance(data, dict):
        what = f"the top level is an object with keys {', '.join(sorted(data)) or 'none'}"
    else:
        what = f"the top level is {kind(data)}"
    raise EvalDataError(
        f"unknown benchmark format ({what}); supported: {', '.join(FORMATS)}",
        path=str(path),
        record=record,
    )
