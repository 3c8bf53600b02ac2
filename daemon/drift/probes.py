"""Drift probe sets, and the base model's next-token distributions on them.

A probe is a prompt that edits should leave alone. The set comes from a JSONL
file (objects with ``"prompt"``; other keys are ignored, so a locality file with
targets works), from what editd knows of the model
(:func:`daemon.model.source.knowledge_of`: a fact world's ``probe`` split) or
from the shipped common facts (drift compares distributions, not answers).

``BaseScores`` summarises the base model's next-token distribution at each
probe's last prompt token: the top-1 id, the top-k log-probs and ids, and the
log of the remaining tail mass. It is computed once (``score_base``), saved as
a ``.safetensors`` file whose metadata carry a format version and the probe
set's fingerprint (a sha256 of the prompts in order), so scores of another
probe set are detected as stale instead of silently misaligned.

Every forward pass runs inside ``routing(prompts)`` with exactly the batch's
prompts in row order (an editor's per-request routing; ``null_routing`` for
the base model). Batches are left-padded, with position ids counted from the
attention mask as ``generate`` does, so a probe scores the same in any batch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from daemon.errors import EditdError, EvalDataError
from daemon.log import get_logger
from daemon.model.batches import padded_forward_inputs
from daemon.model.tokens import last_prompt_token_indices

BASE_SCORES_VERSION = 1
DEFAULT_MAX_PROBES = 1000
DEFAULT_TOP_K = 64
Routing = Callable[[Sequence[str]], AbstractContextManager[None]]
log = get_logger(__name__)


class BaseScoresError(EditdError):
    """A base-scores file is missing, unreadable, of another version, or malformed."""


class StaleBaseScoresError(BaseScoresError):
    """Base scores were computed for a different probe set than the one in use."""

    def __init__(self, expected: str, found: str):
        super().__init__(
            f"base scores are stale: computed for probe set {found[:12]}, "
            f"the probes in use are {expected[:12]} (rescore the base model)",
            expected=expected,
            found=found,
        )


@dataclass(frozen=True)
class Probe:
    """One drift probe: a prompt whose next-token distribution edits should not move."""

    prompt: str

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ValueError("probe prompt must not be empty")


def null_routing(prompts: Sequence[str]) -> AbstractContextManager[None]:
    """The routing of a model without an editor: nothing to do."""
    return nullcontext()


# --- probe sets -------------------------------------------------------------------------


def load_probes_jsonl(
    path: Path | str, *, max_probes: int | None = DEFAULT_MAX_PROBES
) -> list[Probe]:
    """The probes of a JSONL file, first occurrence of each prompt kept, at most ``max_probes``.

    Blank lines are skipped. Raises ``EvalDataError`` naming the line for invalid
    JSON, a non-object, or a missing/empty/non-string ``"prompt"``, and when the
    file holds no probe at all.
    """
    if max_probes is not None and max_probes < 1:
        raise ValueError(f"max_probes must be >= 1, got {max_probes}")
    where = str(path)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalDataError(f"cannot read the probe file: {exc}", path=where) from exc
    prompts: list[str] = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            prompts.append(_probe_prompt(line, number, where))
    probes = unique_probes(prompts, max_probes)
    if not probes:
        raise EvalDataError("the probe file holds no probes", path=where)
    if max_probes is not None and len(probes) == max_probes and len(set(prompts)) > max_probes:
        log.info("probes_capped", path=where, kept=max_probes, available=len(set(prompts)))
    return probes


def _probe_prompt(line: str, number: int, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise EvalDataError(f"line {number}: not valid JSON: {exc.msg}", path=where) from exc
    if not isinstance(record, dict):
        raise EvalDataError(f"line {number}: expected a JSON object", path=where)
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise EvalDataError(
            f"line {number}: 'prompt' must be a non-empty string", path=where, field="prompt"
        )
    return prompt


def unique_probes(prompts: Sequence[str], limit: int | None = None) -> list[Probe]:
    """``prompts`` as probes, each prompt once, in first-seen order (at most ``limit``)."""
    seen: set[str] = set()
    out: list[Probe] = []
    for prompt in prompts:
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append(Probe(prompt))
        if limit is not None and len(out) >= limit:
            break
    return out


def probe_fingerprint(probes: Sequence[Probe]) -> str:
    """A sha256 of the prompts in order: base scores are valid only for this exact list."""
    blob = json.dumps([p.prompt for p in probes], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# --- the base model's scores ------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BaseScores:
    """The base model's next-token distribution summary per probe (row i = probe i)."""

    fingerprint: str
    top1: torch.Tensor  # (N,) long: argmax id
    topk_logprobs: torch.Tensor  # (N, k) float32, descending
    topk_ids: torch.Tensor  # (N, k) long
    tail_logmass: torch.Tensor  # (N,) float32: log of the mass outside the top k (-inf: none)
    model: str = ""

    def __post_init__(self) -> None:
        n = self.top1.shape[0]
        if self.top1.dim() != 1 or self.tail_logmass.shape != (n,):
            raise BaseScoresError("top1 and tail_logmass must be vectors of one length")
        if self.topk_logprobs.dim() != 2 or self.topk_logprobs.shape != self.topk_ids.shape:
            raise BaseScoresError("topk_logprobs and topk_ids must be matching (N, k) matrices")
        if self.topk_ids.shape[0] != n:
            raise BaseScoresError(f"top-k rows {self.topk_ids.shape[0]} != {n} probes")

    @property
    def n(self) -> int:
        return int(self.top1.shape[0])

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])

    def check_probes(self, probes: Sequence[Probe]) -> None:
        """Raise ``StaleBaseScoresError`` unless these scores belong to exactly ``probes``."""
        expected = probe_fingerprint(probes)
        if expected != self.fingerprint:
            raise StaleBaseScoresError(expected, self.fingerprint)

    def save(self, path: Path | str) -> Path:
        """Write a ``.safetensors`` file (atomically, via a sibling temp file)."""
        out = Path(path)
        tmp = out.with_name(f".{out.name}.tmp")
        tensors = {
            "top1": self.top1.contiguous().cpu(),
            "topk_logprobs": self.topk_logprobs.contiguous().cpu(),
            "topk_ids": self.topk_ids.contiguous().cpu(),
            "tail_logmass": self.tail_logmass.contiguous().cpu(),
        }
        meta = {
            "version": str(BASE_SCORES_VERSION),
            "fingerprint": self.fingerprint,
            "model": self.model,
        }
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata=meta)
            tmp.replace(out)
        except (OSError, SafetensorError) as exc:
            with suppress(OSError):
                tmp.unlink()
            raise BaseScoresError(f"{out}: cannot write base scores: {exc}") from exc
        log.info("drift_base_scores_saved", path=str(out), probes=self.n, k=self.k)
        return out

    @classmethod
    def load(cls, path: Path | str, *, probes: Sequence[Probe] | None = None) -> BaseScores:
        """Read a file written by ``save``; with ``probes``, also check it is not stale."""
        where = Path(path)
        try:
            with safe_open(str(where), framework="pt") as fh:
                meta: dict[str, str] = fh.metadata() or {}
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
        except (OSError, SafetensorError) as exc:
            raise BaseScoresError(f"{where}: cannot read base scores: {exc}") from exc
        if meta.get("version") != str(BASE_SCORES_VERSION):
            raise BaseScoresError(
                f"{where}: unsupported base scores version {meta.get('version')!r} "
                f"(this code reads {BASE_SCORES_VERSION})"
            )
        try:
            scores = cls(
                fingerprint=meta["fingerprint"],
                top1=tensors["top1"],
                topk_logprobs=tensors["topk_logprobs"],
                topk_ids=tensors["topk_ids"],
                tail_logmass=tensors["tail_logmass"],
                model=meta.get("model", ""),
            )
        except KeyError as exc:
            raise BaseScoresError(f"{where}: base scores lack {exc}") from exc
        if probes is not None:
            scores.check_probes(probes)
        return scores


def score_base(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    probes: Sequence[Probe],
    routing: Routing = null_routing,
    *,
    k: int = DEFAULT_TOP_K,
    batch_size: int = 32,
    model_name: str = "",
) -> BaseScores:
    """The base model's ``BaseScores`` on ``probes`` (k is capped at the vocabulary size)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    parts: list[tuple[torch.Tensor, ...]] = []
    for _, logprobs in last_token_logprobs(model, tokenizer, probes, routing, batch_size):
        parts.append(summarise(logprobs, k))
    top1, values, ids, tail = (torch.cat(column) for column in zip(*parts, strict=True))
    log.info("drift_base_scored", probes=len(probes), k=int(ids.shape[1]), model=model_name)
    return BaseScores(probe_fingerprint(probes), top1, values, ids, tail, model=model_name)


def summarise(
    logprobs: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top1, top-k log-probs, top-k ids, tail log-mass) of log-probs ``(B, V)``."""
    kk = min(k, logprobs.shape[-1])
    values, ids = torch.topk(logprobs, kk, dim=-1)  # (B, kk)
    return logprobs.argmax(dim=-1), values, ids, tail_logmass(logprobs, ids)


def tail_logmass(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log of the probability mass outside ``ids`` per row: ``(B, V), (B, k) -> (B,)``.

    A logsumexp over the other entries (stable, exact); ``-inf`` when ``ids`` cover all.
    """
    masked = logprobs.scatter(-1, ids, float("-inf"))  # (B, V)
    return torch.logsumexp(masked, dim=-1)


# --- batched forwards -------------------------------------------------------------------


@torch.no_grad()
def last_token_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    probes: Sequence[Probe],
    routing: Routing,
    batch_size: int,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Per batch: (first row index, float32 log-probs ``(B, V)`` of the next token, on CPU)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not probes:
        raise ValueError("no probes to score")
    was_training = model.training
    model.train(False)
    try:
        for start in range(0, len(probes), batch_size):
            prompts = [p.prompt for p in probes[start : start + batch_size]]
            yield start, _forward_last(model, tokenizer, prompts, routing)
    finally:
        model.train(was_training)


def _forward_last(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    routing: Routing,
) -> torch.Tensor:
    ids, mask = left_padded(tokenizer, prompts)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    with routing(prompts):
        logits = cast(Any, model)(
            **padded_forward_inputs(ids, mask), use_cache=False
        ).logits  # (B, T, V)
    last = last_prompt_token_indices(mask)  # (B,)
    rows = logits[torch.arange(len(prompts), device=device), last].float()  # (B, V)
    return torch.log_softmax(rows, dim=-1).cpu()


def left_padded(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both ``(B, T)`` long, padded on the left."""
    rows: list[list[int]] = tokenizer(list(prompts))["input_ids"]
    for prompt, row in zip(prompts, rows, strict=True):
        if not row:
            raise ValueError(f"probe tokenizes to nothing: {prompt!r}")
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask
