"""The drift job: probe the edited model against the base, and repair it when it drifts.

:class:`DriftMonitor` holds the probe set (``[drift] probes``, a JSONL file; by
default 200 prompts from the fact world's probe split) and the base model's
scores on it, computed once before any edit is loaded and cached beside the
store (``drift/base-<fingerprint>.safetensors``).

``check`` scores the edited model (top-1 agreement, mean KL(base || edited)) and
the retention of a sample of applied edits, records the run in the store and
the metrics. ``rollback`` (after a failed check):

1. restores the newest valid checkpoint (checkpoints are only written after a
   passing check, so it is good) or the base model when there is none;
2. marks every edit applied after it ``quarantined``;
3. re-applies them in halves with a probe run after each
   (``daemon.drift.isolate``) to find the edits that cause the damage;
4. marks those ``failed`` with the drift evidence and the others ``applied``
   again, reconciles the model with the store and writes a fresh checkpoint.

Callers hold the engine lock throughout, so no batch or completion interleaves.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any, Protocol

import structlog

from daemon.config import Config, DriftConfig
from daemon.drift.commonfacts import probe_prompts
from daemon.drift.isolate import isolate_damaging
from daemon.drift.probes import (
    BaseScores,
    BaseScoresError,
    Probe,
    load_probes_jsonl,
    probe_fingerprint,
    score_base,
    unique_probes,
)
from daemon.drift.scoring import DriftScores, DriftThresholds, judge, score_edited
from daemon.engine.engine import Engine
from daemon.errors import ConfigError
from daemon.model.knowledge import knowledge_of
from daemon.model.loading import LoadedModel
from daemon.service.checkpoints import CheckpointManager, Persistable
from daemon.service.metrics import DaemonMetrics
from daemon.service.replay import applied_in_order, reconcile
from daemon.service.worker import expectations_of, spec_of
from store import editlog
from store.db import Store
from store.edits import EditRecord
from store.probes import record_probe_run
from store.queue import EditQueue
from store.schema import Backend, EditStatus

log = structlog.get_logger()


DEFAULT_PROBES = 200
"""Probe prompts drawn from what the model's source knows (a fact world's probe split)."""


class RollbackHost(Protocol):
    """What a drift rollback needs from the daemon (:class:`daemon.service.daemon.Daemon`
    is one): the live engine, queue, store and checkpoints, and what to checkpoint."""

    @property
    def config(self) -> Config: ...

    @property
    def metrics(self) -> DaemonMetrics: ...

    def live_engine(self) -> Engine: ...

    def live_queue(self) -> EditQueue: ...

    def live_store(self) -> Store: ...

    def live_checkpoints(self) -> CheckpointManager: ...

    def persistables(self) -> dict[str, Persistable]: ...


@dataclass(frozen=True)
class DriftReport:
    """One drift check: the scores, the retention sample and the verdict."""

    passed: bool
    reasons: tuple[str, ...]
    scores: dict[str, Any]
    retention: float | None
    sampled: int
    seconds: float
    rollback: dict[str, Any] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reasons": list(self.reasons),
            **self.scores,
            "retention": self.retention,
            "retention_sampled": self.sampled,
            "seconds": self.seconds,
            "rollback": self.rollback,
        }


def drift_probes(cfg: Config, name_or_path: str) -> list[Probe]:
    """The probes for ``cfg``: the configured file, those of the model's source (a fact
    world's probe split), or (any other model) the shipped common-facts prompts
    (:mod:`daemon.drift.commonfacts`). MELO calibrates its routing radius on the same
    prompts (``editd eval`` builds its editors likewise)."""
    if cfg.drift.probes:
        return load_probes_jsonl(cfg.drift.probes)
    known = knowledge_of(name_or_path)
    if known is not None:
        return unique_probes(known.probe_prompts(DEFAULT_PROBES))
    probes = [Probe(prompt) for prompt in probe_prompts()]
    log.info("drift_probes_common_facts", probes=len(probes))
    return probes


class DriftMonitor:
    """Probe set, base scores and the check/rollback procedures."""

    def __init__(self, config: DriftConfig, probes: Sequence[Probe], scores_path: Path) -> None:
        if not probes:
            raise ConfigError("the drift probe set is empty", key="drift.probes")
        self.config = config
        self.probes = list(probes)
        self.scores_path = scores_path
        self.base: BaseScores | None = None

    @classmethod
    def build(cls, cfg: Config, loaded: LoadedModel, store: Store) -> DriftMonitor:
        """The monitor for ``cfg``: probes from the configured file, the fact world, or
        (any other model) the shipped common-facts prompts (:mod:`daemon.drift.commonfacts`)."""
        probes = drift_probes(cfg, loaded.name_or_path)
        fingerprint = probe_fingerprint(probes)[:16]
        path = store.path.parent / "drift" / f"base-{fingerprint}.safetensors"
        return cls(cfg.drift, probes, path)

    def prompts(self) -> list[str]:
        return [p.prompt for p in self.probes]

    def prepare(self, engine: Engine) -> None:
        """Load the cached base scores, or score the probes now (before any edit is loaded)."""
        if self.scores_path.is_file():
            try:
                self.base = BaseScores.load(self.scores_path, probes=self.probes)
                return
            except BaseScoresError as exc:
                log.warning("base_scores_stale", path=str(self.scores_path), error=str(exc))
        if any(engine.applied_ids().values()):
            raise ConfigError("base scores must be computed before any edit is loaded")
        t0 = time.perf_counter()
        with engine.lock:
            self.base = score_base(
                engine.loaded.model,
                engine.loaded.tokenizer,
                self.probes,
                engine.routing,
                model_name=engine.loaded.name_or_path,
            )
        self.scores_path.parent.mkdir(parents=True, exist_ok=True)
        self.base.save(self.scores_path)
        log.info(
            "base_scores_computed",
            probes=len(self.probes),
            seconds=round(time.perf_counter() - t0, 2),
            path=str(self.scores_path),
        )

    # --- checks -------------------------------------------------------------------------

    def scores(self, engine: Engine) -> DriftScores:
        if self.base is None:
            raise ConfigError("drift base scores are not prepared")
        with engine.lock:
            return score_edited(
                engine.loaded.model, engine.loaded.tokenizer, self.probes, self.base, engine.routing
            )

    def retention(self, engine: Engine, store: Store) -> tuple[float | None, int]:
        """Fraction of a sample of applied edits whose prompt still gives the target."""
        applied = applied_in_order(store)
        if not applied:
            return None, 0
        rng = random.Random(len(applied))
        sample = rng.sample(applied, min(self.config.retention_sample, len(applied)))
        checks = engine.verify([spec_of(r, engine.kinds) for r in sample], expectations_of(sample))
        return sum(c.passed for c in checks.values()) / len(checks), len(checks)

    def check(
        self, engine: Engine, queue: EditQueue, store: Store, metrics: DaemonMetrics
    ) -> DriftReport:
        """Score the probes and the retention sample; record the run."""
        t0 = time.perf_counter()
        with engine.lock:
            scores = self.scores(engine)
            retention, sampled = self.retention(engine, store)
        verdict = judge(scores, retention, DriftThresholds.from_config(self.config))
        report = DriftReport(
            passed=verdict.passed,
            reasons=verdict.reasons,
            scores=scores.to_json(),
            retention=retention,
            sampled=sampled,
            seconds=round(time.perf_counter() - t0, 3),
        )
        record_probe_run(store, "drift", report.to_json_dict(), verdict.passed)
        metrics.drift_run(
            top1_agreement=scores.top1_agreement,
            mean_kl=scores.mean_kl,
            retention=retention,
            passed=verdict.passed,
        )
        log.info("drift_checked", **report.to_json_dict())
        return report

    def healthy(self, engine: Engine) -> bool:
        """The probes alone pass (used while isolating: retention is not meaningful then)."""
        thresholds = DriftThresholds.from_config(self.config)
        return judge(self.scores(engine), None, thresholds).passed

    # --- repair -------------------------------------------------------------------------

    def rollback(self, daemon: RollbackHost, evidence: DriftReport) -> dict[str, Any]:
        """Restore the last good state and isolate the damaging edits (see the module doc)."""
        engine, queue, store = daemon.live_engine(), daemon.live_queue(), daemon.live_store()
        manager = daemon.live_checkpoints()
        t0 = time.perf_counter()
        with engine.lock:
            found = manager.latest_valid()
            in_checkpoint = (
                {e for ids in found[1].edit_ids.values() for e in ids} if found else set()
            )
            since = [r for r in applied_in_order(store) if r.id not in in_checkpoint]
            if not since:
                log.warning("drift_without_new_edits", reasons=list(evidence.reasons))
                return {"restored": None, "quarantined": 0, "culprits": []}
            engine.reset()
            if found is not None:
                manager.restore(found[0], daemon.persistables())
            why = "drift: " + "; ".join(evidence.reasons)
            for record in since:
                queue.transition(record.id, EditStatus.QUARANTINED, reason=why)
            reconcile(engine, queue, store, verify=False)
            daemon.metrics.rolled_back()
            result = isolate_damaging(
                since,
                lambda items: _apply(engine, items),
                lambda: self.healthy(engine),
                undo=lambda items: _undo(engine, items),
            )
            culprits = {r.id for r in result.culprits}
            for record in since:
                if record.id in culprits:
                    evidence_text = f"{why} (isolated by re-applying in halves)"
                    queue.transition(
                        record.id, EditStatus.FAILED, reason=evidence_text, data=evidence.scores
                    )
                else:
                    queue.transition(
                        record.id, EditStatus.APPLYING, reason="re-applied after drift"
                    )
                    queue.transition(record.id, EditStatus.APPLIED, reason="re-applied after drift")
            reconcile(engine, queue, store, verify=daemon.config.worker.verify)
            manager.create(
                daemon.persistables(),
                watermark=editlog.last_event_id(store),
                reason="after drift rollback",
                extra={"model": engine.loaded.name_or_path},
            )
        summary = {
            "restored": None if found is None else found[0].id,
            "quarantined": len(since),
            "culprits": sorted(culprits),
            "probe_runs": result.probe_runs,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        log.warning("drift_rolled_back", **summary)
        return summary


def _by_backend(items: Sequence[EditRecord]) -> list[tuple[Backend, list[EditRecord]]]:
    """Runs of consecutive edits by the back-end that applied them (applied edits name
    theirs; one that does not is left out, as replay leaves it out)."""
    return [
        (Backend(name), list(group))
        for name, group in groupby(items, key=lambda r: r.backend)
        if name is not None
    ]


def _apply(engine: Engine, items: Sequence[EditRecord]) -> None:
    for backend, group in _by_backend(items):
        engine.apply(backend, [spec_of(r, engine.kinds) for r in group])


def _undo(engine: Engine, items: Sequence[EditRecord]) -> None:
    for backend, group in _by_backend(items):
        engine.retract(backend, [r.id for r in group])
