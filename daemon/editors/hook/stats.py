"""Key covariance statistics ``C = E[k k^T]`` at the hook layers, and their stored artefact.

Keys are the INPUTS of each hook layer's MLP output projection (found through
``daemon.model.arch``), captured with forward pre-hooks. Only real tokens count:
pad positions are dropped with the attention mask, and sequences are padded here
(on the left, with positions counted from the first real token) so the result does
not depend on the tokenizer's padding side or on how texts are batched.

An artefact is two files: ``<name>.safetensors`` (one float64 ``(d_in, d_in)`` tensor
per layer, named ``layer.<i>``) and ``<name>.json``, a manifest with a ``"version"``,
the ``StatsMeta`` fields and the sha256 of the safetensors file. Model identity is
the caller's ``model_id`` (e.g. the name or path it was loaded from) plus
``model_fingerprint``: the sha256 of the model's config (minus its name/path and the
transformers version) and of every parameter's name, shape and dtype. It does not
hash the weights themselves: a fine-tune of the same shape needs its own ``model_id``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from daemon.errors import CovarianceStatsError
from daemon.files import atomic_write, atomic_write_text, sha256_file
from daemon.model import arch
from daemon.model.batches import padded_forward_inputs
from daemon.model.partial import forward_until

log = structlog.get_logger()

STATS_FORMAT_VERSION = 1
PROGRESS_EVERY_S = 15.0
"""Without a progress bar, a ``covariance_progress`` event this often (seconds)."""


@dataclass(frozen=True)
class StatsMeta:
    """What a covariance artefact was computed from; all fields must match to reuse it."""

    model_id: str
    fingerprint: str
    layers: tuple[int, ...]
    token_budget: int
    token_count: int
    dtype: str  # the model's dtype when the statistics were collected
    texts_sha256: str

    def key(self) -> dict[str, Any]:
        """The fields known before computing (everything but ``token_count``)."""
        out = asdict(self)
        out.pop("token_count")
        out["layers"] = list(self.layers)
        return out


# --- collecting ------------------------------------------------------------------------


def _pad_left(
    ids: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(ids), width), dtype=torch.long)  # (B, T)
    for row, seq in enumerate(ids):
        if seq:
            input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return input_ids.to(device), mask.to(device)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0  # any id works: pad positions are masked out and never counted


@contextlib.contextmanager
def _capture_inputs(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the input of each layer's MLP output projection on every forward pass.

    Callers run the forward only up to the highest layer's projection
    (:func:`daemon.model.partial.forward_until`).
    """
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(i: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            captured[i] = args[0].detach()  # (B, T, d_in)

        return hook

    try:
        for i in layers:
            handles.append(arch.mlp_out_module(model, i).register_forward_pre_hook(make_hook(i)))
        yield captured
    finally:
        for h in handles:
            h.remove()


def _batches(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int, max_length: int
) -> Iterator[list[list[int]]]:
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        enc = tokenizer(chunk, add_special_tokens=True, truncation=True, max_length=max_length)
        ids = [list(x) for x in enc["input_ids"]]
        ids = [x for x in ids if x]
        if ids:
            yield ids


def collect_covariance(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    token_budget: int,
    batch_size: int = 16,
    progress: bool = True,
    max_length: int = 256,
) -> dict[int, torch.Tensor]:
    """``E[k k^T]`` over the first ``token_budget`` real tokens of ``texts``, per layer.

    Texts are read in order and tokens counted in reading order, so the result is
    deterministic and independent of ``batch_size``. Texts are truncated to
    ``max_length`` tokens. Returns float64 ``(d_in, d_in)`` tensors on the CPU.
    Raises ``CovarianceStatsError`` when no token is seen or a key is NaN/inf.
    """
    stats, _ = collect_covariance_counted(
        model,
        tokenizer,
        texts,
        layers,
        token_budget=token_budget,
        batch_size=batch_size,
        progress=progress,
        max_length=max_length,
    )
    return stats


@torch.no_grad()
def collect_covariance_counted(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    token_budget: int,
    batch_size: int = 16,
    progress: bool = True,
    max_length: int = 256,
) -> tuple[dict[int, torch.Tensor], int]:
    """``collect_covariance`` plus the number of tokens the means are over."""
    if token_budget < 1 or batch_size < 1:
        raise ValueError(
            f"token_budget and batch_size must be >= 1; got {token_budget}, {batch_size}"
        )
    device = next(model.parameters()).device
    sums: dict[int, torch.Tensor] = {}
    seen = 0
    started = last_report = time.monotonic()
    top = arch.mlp_out_module(model, max(layers))
    with (
        _capture_inputs(model, layers) as captured,
        tqdm(total=token_budget, unit="tok", desc="covariance", disable=not progress) as bar,
    ):
        for ids in _batches(tokenizer, texts, batch_size, max_length):
            input_ids, mask = _pad_left(ids, _pad_id(tokenizer), device)  # (B, T) each
            inputs = padded_forward_inputs(input_ids, mask)
            forward_until(model, top, **inputs, use_cache=False)  # nothing above is needed
            keep = mask.bool()  # (B, T)
            take = min(int(keep.sum()), token_budget - seen)
            for i in layers:
                k = captured[i][keep][:take].to(device="cpu", dtype=torch.float64)  # (take, d_in)
                if not bool(torch.isfinite(k).all()):
                    raise CovarianceStatsError(f"layer {i}: non-finite keys", layer=i)
                sums[i] = sums[i] + k.T @ k if i in sums else k.T @ k  # (d_in, d_in)
            seen += take
            bar.update(take)
            if not progress and time.monotonic() - last_report >= PROGRESS_EVERY_S:
                last_report = time.monotonic()
                elapsed = last_report - started
                log.info(
                    "covariance_progress",
                    tokens=seen,
                    token_budget=token_budget,
                    seconds=round(elapsed, 1),
                    eta_s=round(elapsed * (token_budget - seen) / max(seen, 1), 1),
                )
            if seen >= token_budget:
                break
    if seen == 0:
        raise CovarianceStatsError("no tokens in the texts: cannot compute covariance")
    return {i: sums[i] / seen for i in layers}, seen


# --- identity --------------------------------------------------------------------------


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's config (less name/path and version) and parameter layout."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        cfg = {
            k: v
            for k, v in config.to_dict().items()
            if k not in ("_name_or_path", "transformers_version")
        }
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}\n".encode())
    return h.hexdigest()


def texts_sha256(texts: Sequence[str]) -> str:
    """sha256 of the texts, in order (each one length-prefixed)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode()
        h.update(f"{len(b)}:".encode() + b)
    return h.hexdigest()


# --- the artefact ----------------------------------------------------------------------


def _manifest_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_stats(path: Path | str, stats: dict[int, torch.Tensor], meta: StatsMeta) -> Path:
    """Write ``stats`` to ``path`` (safetensors) and its manifest beside it, atomically each.

    The tensors go first and the manifest (holding their checksum) last, so a
    crash between the two leaves a pair that ``load_stats`` rejects.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if sorted(stats) != sorted(meta.layers):
        raise ValueError(f"stats layers {sorted(stats)} differ from meta layers {meta.layers}")
    tensors = {
        f"layer.{i}": t.detach().to("cpu", torch.float64).contiguous() for i, t in stats.items()
    }
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    manifest = {
        "version": STATS_FORMAT_VERSION,
        **asdict(meta),
        "layers": list(meta.layers),
        "stats_dtype": "float64",
        "sha256": sha256_file(path),
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    atomic_write_text(_manifest_path(path), text)
    return path


def _read_manifest(path: Path) -> dict[str, Any]:
    mpath = _manifest_path(path)
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CovarianceStatsError(f"{mpath}: cannot read the manifest: {e}", path=mpath) from e
    if not isinstance(manifest, dict) or manifest.get("version") != STATS_FORMAT_VERSION:
        raise CovarianceStatsError(
            f"{mpath}: unsupported manifest version (expected {STATS_FORMAT_VERSION})", path=mpath
        )
    return manifest


def load_stats(path: Path | str, expect_meta: StatsMeta) -> dict[int, torch.Tensor]:
    """Read an artefact, verifying its checksum and that it matches ``expect_meta``.

    Raises ``CovarianceStatsError`` naming the file when it is missing, corrupt,
    of another format version, or computed for another model, layer set, token
    budget or count, dtype or text sample.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    try:
        digest = sha256_file(path)
    except OSError as e:
        raise CovarianceStatsError(f"{path}: cannot read: {e}", path=path) from e
    if digest != manifest.get("sha256"):
        raise CovarianceStatsError(f"{path}: checksum mismatch (corrupt file)", path=path)
    stored = {k: manifest.get(k) for k in asdict(expect_meta)}
    wanted = {**asdict(expect_meta), "layers": list(expect_meta.layers)}
    diff = sorted(k for k in wanted if stored[k] != wanted[k])
    if diff:
        raise CovarianceStatsError(
            f"{path}: computed for different {', '.join(diff)}", path=path, fields=diff
        )
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise CovarianceStatsError(f"{path}: cannot load tensors: {e}", path=path) from e
    return {i: tensors[f"layer.{i}"] for i in expect_meta.layers}


def _find_cached(cache: Path, meta: StatsMeta) -> dict[int, torch.Tensor] | None:
    if not _manifest_path(cache).is_file():
        return None
    manifest = _read_manifest(cache)
    token_count = manifest.get("token_count")
    if not isinstance(token_count, int):
        raise CovarianceStatsError(f"{cache}: manifest has no token_count", path=cache)
    full = StatsMeta(**{**meta.key(), "layers": meta.layers, "token_count": token_count})
    return load_stats(cache, full)


def cached_covariance(
    cache_dir: Path | str,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    layers: Sequence[int],
    token_budget: int,
    model_id: str,
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """Covariance per layer, reused from ``cache_dir`` when a matching artefact is there.

    The file name is a hash of everything that determines the result; a corrupt or
    stale artefact is logged and recomputed. Logs ``covariance_stats_computed``
    (seconds, tokens) or ``covariance_stats_reused``.
    """
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    meta = StatsMeta(
        model_id=model_id,
        fingerprint=model_fingerprint(model),
        layers=tuple(sorted(layers)),
        token_budget=token_budget,
        token_count=0,
        dtype=dtype,
        texts_sha256=texts_sha256(texts),
    )
    name = hashlib.sha256(json.dumps(meta.key(), sort_keys=True).encode()).hexdigest()[:20]
    cache = Path(cache_dir) / f"covariance-{name}.safetensors"
    try:
        found = _find_cached(cache, meta)
    except CovarianceStatsError as e:
        log.warning("covariance_stats_invalidated", path=str(cache), reason=str(e))
        found = None
    if found is not None:
        log.info("covariance_stats_reused", path=str(cache), layers=list(meta.layers))
        return found
    start = time.perf_counter()
    stats, tokens = collect_covariance_counted(
        model,
        tokenizer,
        texts,
        meta.layers,
        token_budget=token_budget,
        batch_size=batch_size,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    save_stats(
        cache, stats, StatsMeta(**{**meta.key(), "layers": meta.layers, "token_count": tokens})
    )
    log.info(
        "covariance_stats_computed",
        path=str(cache),
        layers=list(meta.layers),
        tokens=tokens,
        seconds=round(seconds, 3),
    )
    return stats
