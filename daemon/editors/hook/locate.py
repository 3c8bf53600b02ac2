"""Locate: where a model recalls facts, so the hook back-end knows where to write.

COMEBA-HK writes an edit into the MLP output projection of a few layers, keyed at
one token position. Both choices depend on the model: large models (GPT-2 XL,
GPT-J) recall a fact at the SUBJECT'S LAST TOKEN in middle layers (ROME), while a
small fact-world model moves the subject forward with attention early and recalls
at the PROMPT'S LAST TOKEN. So the editor asks the model, once, and caches the
answer (``cached_locate``; ``editd locate`` on the command line).

The method is split in two: :mod:`daemon.editors.hook.locate_trace` pairs facts
and measures, by interchange interventions, where patching one hidden state moves
the answer; :mod:`daemon.editors.hook.locate_choice` chooses the key position and
hook layers from that evidence. This module runs both (``locate``) and caches
the result.

Measured (small 4-layer world, 64 pairs, 1.1 s on one CPU thread): ``mlp_out``
at the prompt's last token moves 0.52 of answers at layer 0 and at most 0.03
elsewhere; at the subject's last token at most 0.02 anywhere. Choice:
``prompt_last``, layer 0 (layers 0-1 with ``window=2``).

Cache: ``locate_cache_dir(config)``, i.e. ``locate/`` beside the SQLite store
(next to the covariance ``stats/``), one ``locate-<fingerprint16>-<settings16>.json``
per model id and fingerprint (``stats.model_fingerprint``), dtype, facts and
``max_pairs``; written atomically; unreadable, corrupt or stale files are logged
and recomputed. The window is not part of the key: a cached result is re-chosen
for another window from its stored evidence.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from daemon.config import Config
from daemon.editors.hook.locate_choice import (
    LOCATE_FORMAT_VERSION,
    LocateResult,
    choose,
    default_window,
)
from daemon.editors.hook.locate_trace import (
    DEFAULT_BATCH_ROWS,
    DEFAULT_MAX_PAIRS,
    DEFAULT_MIN_PAIRS,
    trace_recall,
)
from daemon.editors.hook.patching import TraceFact
from daemon.editors.hook.stats import model_fingerprint
from daemon.errors import LocateError
from daemon.files import atomic_write_text
from daemon.model.loading import LoadedModel

log = structlog.get_logger()


# --- locate --------------------------------------------------------------------------


def facts_sha256(facts: Sequence[TraceFact]) -> str:
    """sha256 of the facts in order (JSON per fact)."""
    h = hashlib.sha256()
    for f in facts:
        h.update(json.dumps([f.prompt, f.subject, f.answer]).encode() + b"\n")
    return h.hexdigest()


def locate(
    loaded: LoadedModel,
    facts: Sequence[TraceFact],
    *,
    model_id: str | None = None,
    window: int | None = None,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    min_pairs: int = DEFAULT_MIN_PAIRS,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> LocateResult:
    """Trace recall on ``facts`` and choose the key position and hook layers."""
    start = time.perf_counter()
    evidence = trace_recall(
        loaded.model,
        loaded.tokenizer,
        facts,
        max_pairs=max_pairs,
        min_pairs=min_pairs,
        batch_rows=batch_rows,
    )
    size = default_window(evidence.n_layers) if window is None else window
    kind, layers = choose(evidence, size)
    return LocateResult(
        key_position=kind,
        layers=layers,
        evidence=evidence,
        model_id=model_id or loaded.cache_id,
        fingerprint=model_fingerprint(loaded.model),
        n_pairs=evidence.n_pairs,
        seconds=round(time.perf_counter() - start, 3),
        window=size,
        facts_sha256=facts_sha256(facts),
    )


# --- the cache -----------------------------------------------------------------------


def locate_cache_dir(config: Config) -> Path:
    """Where results live: ``locate/`` beside the SQLite store (``var/locate/`` by default)."""
    return config.store.path.parent / "locate"


def _cache_key(
    loaded: LoadedModel, model_id: str, facts: Sequence[TraceFact], max_pairs: int
) -> dict[str, Any]:
    return {
        "version": LOCATE_FORMAT_VERSION,
        "model_id": model_id,
        "fingerprint": model_fingerprint(loaded.model),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "facts_sha256": facts_sha256(facts),
        "max_pairs": max_pairs,
    }


def cache_path(cache_dir: Path | str, key: Mapping[str, Any]) -> Path:
    """``locate-<fingerprint16>-<settings16>.json`` under ``cache_dir``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / f"locate-{key['fingerprint'][:16]}-{digest[:16]}.json"


def _read_cached(path: Path, key: Mapping[str, Any]) -> LocateResult | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("key") != dict(key):
            raise LocateError("computed for other settings (key mismatch)")
        return LocateResult.from_json(data.get("result") or {})
    except (OSError, ValueError, LocateError) as e:
        log.warning("locate_cache_invalidated", path=str(path), reason=str(e))
        return None


def cached_locate(
    cache_dir: Path | str,
    loaded: LoadedModel,
    facts: Sequence[TraceFact],
    *,
    model_id: str | None = None,
    window: int | None = None,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    min_pairs: int = DEFAULT_MIN_PAIRS,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    force: bool = False,
) -> LocateResult:
    """``locate``, reused from ``cache_dir`` when a result for this model and facts exists.

    Logs ``locate_reused`` or ``locate_computed`` (and ``locate_cache_invalidated``
    when a file had to be recomputed). ``force`` recomputes regardless.
    """
    mid = model_id or loaded.cache_id
    key = _cache_key(loaded, mid, facts, max_pairs)
    path = cache_path(cache_dir, key)
    found = None if force else _read_cached(path, key)
    if found is not None:
        result = found if window == found.window else found.rechoose(window)
        log.info(
            "locate_reused",
            path=str(path),
            key_position=result.key_position,
            layers=list(result.layers),
        )
        return result
    result = locate(
        loaded,
        facts,
        model_id=mid,
        window=window,
        max_pairs=max_pairs,
        min_pairs=min_pairs,
        batch_rows=batch_rows,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"key": key, "result": result.to_json()}, indent=2, sort_keys=True)
    atomic_write_text(path, text + "\n")
    log.info(
        "locate_computed",
        path=str(path),
        key_position=result.key_position,
        layers=list(result.layers),
        pairs=result.n_pairs,
        seconds=result.seconds,
    )
    return result


def latest_locate(
    cache_dir: Path | str, loaded: LoadedModel, model_id: str | None = None
) -> LocateResult | None:
    """The newest valid cached result for this model (any facts), or ``None``.

    For an editor whose config leaves the hook layers empty ("chosen by
    ``editd locate``") and that does not know which facts were traced.
    """
    fingerprint = model_fingerprint(loaded.model)
    mid = model_id or loaded.cache_id
    files = sorted(
        Path(cache_dir).glob(f"locate-{fingerprint[:16]}-*.json"),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for path in files:
        try:
            result = LocateResult.from_json(json.loads(path.read_text(encoding="utf-8"))["result"])
        except (OSError, ValueError, KeyError, TypeError, LocateError) as e:
            log.warning("locate_cache_invalidated", path=str(path), reason=str(e))
            continue
        if result.fingerprint == fingerprint and result.model_id == mid:
            return result
    return None
