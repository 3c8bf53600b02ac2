"""The live model and its editors, behind one lock.

The :class:`Engine` is the only thing in the daemon that touches the model.
Every change (apply, retract, restore) and every read (completions, verification,
drift probes) runs under one lock, so no request ever sees a half-applied batch.
On two shared CPU cores concurrent forwards are slower than serial ones (see
``docs/environment.md``, "Torch threads on two shared cores"), so a mutex is the
read/write lock's equivalent here: the :class:`EngineLock`. The worker holds it per
batch; completions hold it per prompt and step aside for a waiting batch (or any
other holder), so a batch waits for at most one prompt's generation, not for a queue
of completion requests.

Generation and scoring always run inside :meth:`Engine.routing`, which enters
every editor's per-request routing for the same prompts (MELO routes per row;
the hook back-end's gate decides per token and has no routing).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog

from daemon.config import Config, KindsConfig, cache_dir
from daemon.editors.base import Editor, EditOutcome, EditSpec
from daemon.editors.registry import BACKENDS, make_editor
from daemon.engine.completions import CompletionChoice, CompletionDelta, CompletionRequest
from daemon.engine.kinds import Expectation
from daemon.model.batches import target_token_ids
from daemon.model.generate import greedy_continuations
from daemon.model.loading import LoadedModel
from store.schema import Backend

log = structlog.get_logger()

GREEDY_BATCH = 32
VERIFY_EXTRA_TOKENS = 2
"""Greedy tokens generated past the target's length when verifying an edit."""


@dataclass(frozen=True)
class Verification:
    """Whether an edit took: its prompt (required) and its rephrases (reported).
    ``withheld``: for a ``forget``, the answer that must be absent (else None: the
    target must begin the output)."""

    passed: bool
    prompt_output: str
    rephrases_passed: int = 0
    rephrases_total: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    withheld: str | None = None

    def to_json_dict(self) -> dict[str, Any]:
        out = {
            "passed": self.passed,
            "prompt_output": self.prompt_output,
            "rephrases_passed": self.rephrases_passed,
            "rephrases_total": self.rephrases_total,
        }
        if self.withheld is not None:
            out["withheld"] = self.withheld
        return out


def build_editor(
    name: str, loaded: LoadedModel, config: Config, *, calibration_prompts: Sequence[str] = ()
) -> Editor:
    """The editor ``name`` (a back-end or an evaluation baseline) for ``loaded``, as
    ``config`` describes it: its ``[editors.<name>]`` section, caches beside the store."""
    section = config.editors.section(name) if name in BACKENDS else None
    return make_editor(
        name,
        loaded,
        section,
        cache_dir=cache_dir(config),
        calibration_prompts=calibration_prompts,
    )


class EngineLock:
    """A re-entrant mutex where completions give way.

    ``with lock:`` (batches, retractions, restores, drift checks, verification) waits
    only for the current holder. :meth:`after_waiting` (one completion prompt) also
    waits while any ``with lock:`` caller is waiting, so such a caller is served
    before further completion prompts. A thread that holds the lock re-enters it
    either way.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._waiting = 0  # threads blocked in acquire()

    def acquire(self) -> None:
        """Take the lock as soon as its holder lets go."""
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return
            self._waiting += 1
            try:
                while self._owner is not None:
                    self._cond.wait()
            except BaseException:
                self._waiting -= 1
                self._cond.notify_all()  # completions waiting behind this caller may go
                raise
            self._waiting -= 1
            self._owner, self._depth = me, 1

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("EngineLock released by a thread that does not hold it")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()

    @contextmanager
    def after_waiting(self) -> Iterator[None]:
        """Hold the lock once nobody holds it and no :meth:`acquire` caller waits."""
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
            else:
                while self._owner is not None or self._waiting:
                    self._cond.wait()
                self._owner, self._depth = me, 1
        try:
            yield
        finally:
            self.release()

    @property
    def waiting(self) -> int:
        """Threads waiting in :meth:`acquire` now."""
        with self._cond:
            return self._waiting

    def held(self) -> bool:
        """Whether some thread holds the lock now."""
        with self._cond:
            return self._owner is not None


class Engine:
    """The model, its editors (one per back-end) and the lock around them."""

    def __init__(
        self,
        loaded: LoadedModel,
        editors: Mapping[Backend, Editor],
        kinds: KindsConfig | None = None,
    ) -> None:
        self.loaded = loaded
        self.editors: dict[Backend, Editor] = dict(editors)
        self.kinds = kinds or KindsConfig()
        self.lock = EngineLock()

    @property
    def backends(self) -> tuple[Backend, ...]:
        return tuple(self.editors)

    def editor(self, backend: Backend) -> Editor:
        try:
            return self.editors[backend]
        except KeyError:
            raise KeyError(f"back-end '{backend.value}' is not enabled in this daemon") from None

    # --- routing and reads -----------------------------------------------------------------

    def routing(self, prompts: Sequence[str]) -> AbstractContextManager[None]:
        """Every editor's routing for a forward over exactly ``prompts`` (row order)."""
        return self._routing(list(prompts))

    @contextmanager
    def _routing(self, prompts: list[str]) -> Iterator[None]:
        with ExitStack() as stack:
            for editor in self.editors.values():
                stack.enter_context(editor.routing(prompts))
            yield

    def greedy(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations of ``prompts`` from the edited model (takes the lock)."""
        out: list[str] = []
        with self.lock:
            for start in range(0, len(prompts), GREEDY_BATCH):
                chunk = list(prompts[start : start + GREEDY_BATCH])
                with self.routing(chunk):
                    out.extend(
                        greedy_continuations(
                            self.loaded.model,
                            self.loaded.tokenizer,
                            chunk,
                            max_new_tokens=max_new_tokens,
                            batch_size=GREEDY_BATCH,
                        )
                    )
        return out

    def complete(self, request: CompletionRequest) -> list[CompletionChoice]:
        """OpenAI-style completions from the edited model. Each prompt is generated under
        the lock (:meth:`EngineLock.after_waiting`), so each choice sees one state of the
        model; a batch waiting for the lock goes between two prompts of a request."""
        from daemon.engine.completions import complete

        return complete(
            self.loaded.model,
            self.loaded.tokenizer,
            request,
            self.routing,
            turn=self.lock.after_waiting,
        )

    def stream(self, request: CompletionRequest) -> Generator[CompletionDelta, None, None]:
        """:meth:`complete` token by token (``daemon.engine.completions.stream``). Iterate it
        in one thread: that thread holds the lock while a prompt generates, and closing the
        iterator ends the generation at the next token and lets the lock go."""
        from daemon.engine.completions import stream

        return stream(
            self.loaded.model,
            self.loaded.tokenizer,
            request,
            self.routing,
            turn=self.lock.after_waiting,
        )

    def verify(
        self, specs: Sequence[EditSpec], expect: Mapping[str, Expectation] | None = None
    ) -> dict[str, Verification]:
        """Greedy-generate each edit's prompt and rephrases; passed = the prompt took:
        its output meets the edit's ``expect`` entry (default: begins with the target;
        a ``forget``'s: no longer names the answer withheld, :mod:`daemon.engine.kinds`).

        Specs with the same token budget share batched generation (``GREEDY_BATCH``
        rows at a time), so each edit's output is exactly what it gets alone.
        """
        expect = expect or {}
        wanted = {s.edit_id: expect.get(s.edit_id) or Expectation(s.target) for s in specs}
        by_budget: dict[int, list[EditSpec]] = {}
        for spec in specs:
            by_budget.setdefault(self._budget(spec, wanted[spec.edit_id]), []).append(spec)
        results: dict[str, Verification] = {}
        with self.lock:
            for budget, group in by_budget.items():
                prompts = [p for spec in group for p in (spec.prompt, *spec.rephrases)]
                outs = iter(self.greedy(prompts, budget))
                for spec in group:
                    mine = [next(outs) for _ in range(1 + len(spec.rephrases))]
                    want = wanted[spec.edit_id]
                    hits = [want.met_by(o) for o in mine]
                    results[spec.edit_id] = Verification(
                        passed=hits[0],
                        prompt_output=mine[0],
                        rephrases_passed=sum(hits[1:]),
                        rephrases_total=len(hits) - 1,
                        withheld=want.text if want.absent else None,
                    )
        return {spec.edit_id: results[spec.edit_id] for spec in specs}

    def _budget(self, spec: EditSpec, want: Expectation) -> int:
        tokenizer = self.loaded.tokenizer
        n = len(target_token_ids(tokenizer, spec.prompt, spec.target))
        if want.absent:  # room for the target and then the answer it must not reveal
            n += len(target_token_ids(tokenizer, spec.prompt, want.text))
        return n + VERIFY_EXTRA_TOKENS

    # --- changes ---------------------------------------------------------------------------

    def apply(self, backend: Backend, specs: Sequence[EditSpec]) -> list[EditOutcome]:
        """Apply a batch on one back-end; one outcome per spec, in order."""
        if not specs:
            return []
        editor = self.editor(backend)
        t0 = time.perf_counter()
        with self.lock:
            outcomes = editor.apply(specs)
        log.info(
            "engine_applied",
            backend=backend.value,
            edits=len(specs),
            accepted=sum(o.accepted for o in outcomes),
            seconds=round(time.perf_counter() - t0, 3),
        )
        return outcomes

    def retract(self, backend: Backend, edit_ids: Sequence[str]) -> None:
        """Undo edits on one back-end (ids the back-end does not hold are ignored)."""
        editor = self.editor(backend)
        with self.lock:
            held = set(editor.applied_ids())
            present = [e for e in edit_ids if e in held]
            if present:
                editor.retract(present)
        if present:
            log.info("engine_retracted", backend=backend.value, edit_ids=present)

    def applied_ids(self) -> dict[Backend, list[str]]:
        with self.lock:
            return {b: e.applied_ids() for b, e in self.editors.items()}

    def backend_of(self, edit_id: str) -> Backend | None:
        """The back-end currently holding ``edit_id``, if any."""
        for backend, ids in self.applied_ids().items():
            if edit_id in ids:
                return backend
        return None

    def reset(self) -> None:
        """Retract every edit: the base model again."""
        with self.lock:
            for backend, ids in self.applied_ids().items():
                if ids:
                    self.editors[backend].retract(ids)
        log.info("engine_reset")
