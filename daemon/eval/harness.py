"""The lifelong-editing harness: stream edits through an editor, score at checkpoints.

The editor sees only what a client would send (prompt, target, subject,
relation; training-template rephrases only when ``send_rephrases``). Rephrases,
held-out rephrases and locality probes are used to score, never to edit.

At each checkpoint ALL edits applied so far are scored:

- efficacy: the edit's own prompt greedy-decodes to its target;
- paraphrase / heldout: the same for training-template / held-out rephrases;
- locality: each locality prompt's first ``k`` greedy tokens are exactly the
  base model's (``k`` = the token length of the probe's given answer, 1..8),
  the base answers being computed before any edit;
- retention: efficacy over the first 10% of the edits applied so far;
- teacher_forced: token accuracy of efficacy / paraphrase / locality targets;
- chat: efficacy with each edit's prompt sent as a user turn in the model's chat
  template (models that have one): the reply names the target within
  ``CHAT_REPLY_TOKENS`` tokens;
- base_task: generation accuracy on facts the stream never touched (if given);
- routing (editor ``auto`` only): where the edits went so far (``RoutingTally``).

With ``auto`` (:class:`~daemon.eval.routed.RoutedEditor`) each batch goes through
the daemon's own dispatch: routing (honouring a case's requested back-end),
verification, retraction and escalation.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from tqdm import tqdm

from daemon.editors.base import Editor, EditSpec
from daemon.eval.metrics import fraction_or_none, probability_wins
from daemon.eval.perplexity import perplexity
from daemon.eval.routed import RoutedEditor
from daemon.eval.scoring import (
    PerRow,
    generate,
    generation_hits,
    teacher_forced_accuracies,
)
from daemon.model.answers import reply_mentions
from daemon.model.batches import target_nll, target_token_hits, target_token_ids
from daemon.model.chat import chat_prompt, has_chat_template
from daemon.model.loading import LoadedModel
from store.schema import Backend

log = structlog.get_logger()

LOCALITY_MAX_TOKENS = 8
CHAT_REPLY_TOKENS = 24  # a chat reply may restate the question before the answer


@dataclass(frozen=True)
class EvalCase:
    """One edit of the stream and everything used to score it."""

    spec: EditSpec
    rephrases: tuple[str, ...] = ()
    heldout: tuple[str, ...] = ()
    locality: tuple[tuple[str, str], ...] = ()  # (prompt, given answer)
    backend: Backend = Backend.AUTO  # the request's back-end (read only by ``auto``)
    target_true: str | None = None  # the answer the edit replaces (ES / PS / NS)


@dataclass(frozen=True)
class EvalSettings:
    """How to run the stream."""

    n: int
    checkpoints: tuple[int, ...]
    batch_size: int = 1
    send_rephrases: bool = False
    score_batch_size: int = 32
    progress: bool = True

    def __post_init__(self) -> None:
        if self.n < 1 or self.batch_size < 1 or self.score_batch_size < 1:
            raise ValueError("n, batch_size and score_batch_size must be >= 1")
        if not self.checkpoints or any(c < 1 for c in self.checkpoints):
            raise ValueError("checkpoints must be a non-empty list of positive edit counts")


@dataclass(frozen=True)
class CheckpointScores:
    """The metrics after ``edits`` edits (fractions in [0, 1]; None: nothing to score)."""

    edits: int
    efficacy: float | None
    paraphrase: float | None
    heldout: float | None
    locality: float | None
    retention: float | None
    teacher_forced: dict[str, float | None]
    base_task: float | None
    refused: int
    seconds_per_edit: float
    peak_rss_mb: float
    routing: dict[str, Any] | None = None  # editor ``auto`` only (RoutingTally)
    # ES / PS / NS over the cases that name a target_true (empty in older reports)
    probability: dict[str, float | None] = field(default_factory=dict)
    # perplexity on held-out text: {"base": ..., "edited": ...} (empty: not measured)
    perplexity: dict[str, float] = field(default_factory=dict)
    # efficacy with each prompt sent as a user turn in the model's chat template: the
    # target named in the reply (None: the tokenizer has no chat template)
    chat: float | None = None

    def to_json_dict(self) -> dict[str, Any]:
        out = {
            "edits": self.edits,
            "efficacy": self.efficacy,
            "paraphrase": self.paraphrase,
            "heldout": self.heldout,
            "locality": self.locality,
            "retention": self.retention,
            "teacher_forced": dict(self.teacher_forced),
            "probability": dict(self.probability),
            "perplexity": dict(self.perplexity),
            "chat": self.chat,
            "base_task": self.base_task,
            "refused": self.refused,
            "seconds_per_edit": self.seconds_per_edit,
            "peak_rss_mb": self.peak_rss_mb,
        }
        if self.routing is not None:
            out["routing"] = dict(self.routing)
        return out


@dataclass
class _Stream:
    """Mutable bookkeeping of one run."""

    applied: list[EvalCase] = field(default_factory=list)
    refused: int = 0
    edit_seconds: float = 0.0


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def effective_checkpoints(checkpoints: Sequence[int], n: int) -> list[int]:
    """Checkpoints capped at ``n``, sorted, without duplicates; ``n`` itself always included."""
    return sorted({min(c, n) for c in checkpoints} | {n})


class Harness:
    """Runs one stream of edits through one editor on one loaded model."""

    def __init__(
        self,
        editor: Editor,
        loaded: LoadedModel,
        settings: EvalSettings,
        *,
        base_task: Sequence[tuple[str, str]] = (),
        ppl_texts: Sequence[str] = (),
        on_checkpoint: Callable[[CheckpointScores], None] | None = None,
    ):
        self.editor = editor
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.settings = settings
        self.base_task = list(base_task)
        self.ppl_texts = list(ppl_texts)
        self._base_ppl: float | None = None
        self.on_checkpoint = on_checkpoint
        self._base_locality: dict[tuple[str, int], str] = {}

    def run(self, cases: Sequence[EvalCase]) -> list[CheckpointScores]:
        """Apply the first ``n`` cases in batches; score at every checkpoint."""
        stream_cases = list(cases[: self.settings.n])
        if not stream_cases:
            raise ValueError("no edits to run")
        self._compute_base_locality(stream_cases)
        if self.ppl_texts:
            self._base_ppl = self._perplexity()
        marks = effective_checkpoints(self.settings.checkpoints, len(stream_cases))
        state, results = _Stream(), []
        bar = tqdm(
            total=len(stream_cases),
            desc=f"editing ({self.editor.name})",
            unit="edit",
            disable=not self.settings.progress,
        )
        for start in range(0, len(stream_cases), self.settings.batch_size):
            batch = stream_cases[start : start + self.settings.batch_size]
            self._apply(batch, state)
            bar.update(len(batch))
            while marks and len(state.applied) >= marks[0]:
                scores = self.score(state, marks.pop(0))
                results.append(scores)
                if self.on_checkpoint is not None:
                    self.on_checkpoint(scores)
        bar.close()
        return results

    def _spec_for(self, case: EvalCase) -> EditSpec:
        if not self.settings.send_rephrases:
            return case.spec
        return EditSpec(
            case.spec.edit_id,
            case.spec.prompt,
            case.spec.target,
            case.spec.subject,
            case.spec.relation,
            rephrases=case.rephrases,
        )

    def _apply(self, batch: Sequence[EvalCase], state: _Stream) -> None:
        specs = [self._spec_for(c) for c in batch]
        t0 = time.perf_counter()
        if isinstance(self.editor, RoutedEditor):
            outcomes = self.editor.apply_routed(
                [(s, c.backend) for s, c in zip(specs, batch, strict=True)]
            )
        else:
            outcomes = self.editor.apply(specs)
        state.edit_seconds += time.perf_counter() - t0
        refused = [o for o in outcomes if not o.accepted]
        state.refused += len(refused)
        for outcome in refused:
            log.info(
                "edit_refused",
                edit_id=outcome.edit_id,
                reason=outcome.reason,
                editor=self.editor.name,
            )
        state.applied.extend(batch)

    def _locality_k(self, prompt: str, given: str) -> int:
        return max(
            1, min(LOCALITY_MAX_TOKENS, len(target_token_ids(self.tokenizer, prompt, given)))
        )

    def _locality_by_k(self, cases: Sequence[EvalCase], *, unique: bool) -> dict[int, list[str]]:
        """Locality prompts grouped by their answer length k (optionally without repeats)."""
        by_k: dict[int, list[str]] = {}
        seen: set[tuple[str, int]] = set()
        for case in cases:
            for prompt, given in case.locality:
                k = self._locality_k(prompt, given)
                if unique and (prompt, k) in seen:
                    continue
                seen.add((prompt, k))
                by_k.setdefault(k, []).append(prompt)
        return by_k

    def _compute_base_locality(self, cases: Sequence[EvalCase]) -> None:
        """The base model's first-k-token answer to every locality probe, before any edit."""
        by_k = self._locality_by_k(cases, unique=True)
        for k, prompts in by_k.items():
            texts = generate(
                self.editor,
                self.model,
                self.tokenizer,
                prompts,
                max_new_tokens=k,
                batch_size=self.settings.score_batch_size,
            )
            self._base_locality.update({(p, k): t for p, t in zip(prompts, texts, strict=True)})

    def _locality_hits(self, cases: Sequence[EvalCase]) -> tuple[list[bool], list[float]]:
        by_k = self._locality_by_k(cases, unique=False)
        hits: list[bool] = []
        forced: list[float] = []
        bs = self.settings.score_batch_size
        for k, prompts in by_k.items():
            texts = generate(
                self.editor, self.model, self.tokenizer, prompts, max_new_tokens=k, batch_size=bs
            )
            base = [self._base_locality[(p, k)] for p in prompts]
            hits.extend(t == b for t, b in zip(texts, base, strict=True))
            scorable = [(p, b) for p, b in zip(prompts, base, strict=True) if b.strip()]
            forced.extend(
                teacher_forced_accuracies(
                    self.editor,
                    self.model,
                    self.tokenizer,
                    [p for p, _ in scorable],
                    [b for _, b in scorable],
                    batch_size=bs,
                )
            )
        return hits, forced

    def _hits(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        return generation_hits(
            self.editor,
            self.model,
            self.tokenizer,
            [p for p, _ in pairs],
            [t for _, t in pairs],
            batch_size=self.settings.score_batch_size,
        )

    def _forced(
        self, pairs: Sequence[tuple[str, str]], per_row: PerRow = target_token_hits
    ) -> list[float]:
        return teacher_forced_accuracies(
            self.editor,
            self.model,
            self.tokenizer,
            [p for p, _ in pairs],
            [t for _, t in pairs],
            batch_size=self.settings.score_batch_size,
            per_row=per_row,
        )

    def _chat_hits(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """Each prompt as a user turn in the chat template: does the reply name the target?"""
        if not pairs or not has_chat_template(self.tokenizer):
            return []
        replies = generate(
            self.editor,
            self.model,
            self.tokenizer,
            [chat_prompt(self.tokenizer, p) for p, _ in pairs],
            max_new_tokens=CHAT_REPLY_TOKENS,
            batch_size=self.settings.score_batch_size,
        )
        return [reply_mentions(r, t) for r, (_, t) in zip(replies, pairs, strict=True)]

    def _perplexity(self) -> float:
        return round(perplexity(self.editor, self.model, self.tokenizer, self.ppl_texts), 4)

    def _probability(self, cases: Sequence[EvalCase]) -> dict[str, float | None]:
        """CounterFact's probability metrics over the cases that name their true answer:
        ES (the new target likelier than the true one on the prompt), PS (on the
        rephrases), NS (the true one still likelier on the locality prompts)."""
        scored = [c for c in cases if c.target_true is not None]
        out: dict[str, float | None] = {}
        prompts_of: dict[str, Callable[[EvalCase], Sequence[str]]] = {
            "es": lambda c: [c.spec.prompt],
            "ps": lambda c: c.rephrases,
            "ns": lambda c: [p for p, _ in c.locality],
        }
        for name, prompts in prompts_of.items():
            want_new = name != "ns"
            rows = [(p, c) for c in scored for p in prompts(c)]
            new = self._forced([(p, c.spec.target) for p, c in rows], target_nll)
            true = self._forced([(p, str(c.target_true)) for p, c in rows], target_nll)
            wins = probability_wins(new, true) if want_new else probability_wins(true, new)
            out[name] = fraction_or_none(wins)
        return out

    def score(self, state: _Stream, edits: int) -> CheckpointScores:
        """Score every edit applied so far."""
        cases = state.applied
        own = [(c.spec.prompt, c.spec.target) for c in cases]
        para = [(r, c.spec.target) for c in cases for r in c.rephrases]
        held = [(r, c.spec.target) for c in cases for r in c.heldout]
        own_hits = self._hits(own)
        early = own_hits[: max(1, len(cases) // 10)]
        loc_hits, loc_forced = self._locality_hits(cases)
        scores = CheckpointScores(
            edits=edits,
            efficacy=fraction_or_none(own_hits),
            paraphrase=fraction_or_none(self._hits(para)),
            heldout=fraction_or_none(self._hits(held)),
            locality=fraction_or_none(loc_hits),
            retention=fraction_or_none(early),
            teacher_forced={
                "efficacy": fraction_or_none(self._forced(own)),
                "paraphrase": fraction_or_none(self._forced(para)),
                "locality": fraction_or_none(loc_forced),
            },
            probability=self._probability(cases),
            chat=fraction_or_none(self._chat_hits(own)),
            perplexity=(
                {"base": self._base_ppl, "edited": self._perplexity()}
                if self._base_ppl is not None
                else {}
            ),
            base_task=fraction_or_none(self._hits(self.base_task)),
            refused=state.refused,
            seconds_per_edit=state.edit_seconds / max(1, len(cases)),
            peak_rss_mb=round(peak_rss_mb(), 1),
            routing=(
                self.editor.tally.to_json_dict() if isinstance(self.editor, RoutedEditor) else None
            ),
        )
        log.info("eval_checkpoint_scored", editor=self.editor.name, **scores.to_json_dict())
        return scores
