"""Load a causal LM and its tokenizer from a local folder (or the local HF cache).

``load_model`` is the one entry point. It resolves the device and dtype, checks
the architecture against the table in ``arch`` before reading any weights, and
returns a frozen ``LoadedModel`` with the model in eval mode and every parameter
frozen (editors unfreeze or wrap what they train).

Tokenizer contract, relied on by the editors and the completions API:

- it is a fast (Rust ``tokenizers``) tokenizer, because subject positions are
  found from character offsets (``return_offsets_mapping``);
- it has a pad token: the eos token is reused when none is set; embeddings are
  never resized, so a tokenizer with neither is an error;
- ``padding_side`` is ``"left"``, so a batch of prompts ends at the same
  position and batched greedy generation appends after the real tokens. Code that
  needs right padding (teacher-forced scoring) sets it per call.

Failures surface as one-line ``ModelLoadError`` messages naming the path and what
was missing, chained (``from e``) to the library's own exception.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from daemon.errors import ModelLoadError
from daemon.model.arch import ArchSpec, spec_for_model_type

log = structlog.get_logger()

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference and editing, with what was used to load it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    arch: ArchSpec
    name_or_path: str
    load_seconds: float

    @property
    def cache_id(self) -> str:
        """The model's identity in caches: its absolute folder (however the path was
        written), or the name it was loaded by."""
        path = Path(self.name_or_path).expanduser()
        return str(path.resolve()) if path.is_dir() else self.name_or_path


def resolve_device(device: str) -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; ``cpu``; ``cuda`` or ``cuda:N``."""
    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        return _cuda_device(device, name)
    raise ModelLoadError(
        f"unknown device '{device}' (expected auto, cpu, cuda or cuda:N)", device=device
    )


def _cuda_device(requested: str, name: str) -> torch.device:
    if not torch.cuda.is_available():
        raise ModelLoadError(
            f"device '{requested}' was requested but CUDA is not available "
            f"(torch {torch.__version__}, no usable GPU); use device 'cpu' or 'auto'",
            device=requested,
        )
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ModelLoadError(f"bad device '{requested}': {e}", device=requested) from e
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ModelLoadError(
            f"device '{requested}' does not exist ({count} CUDA device(s) visible)",
            device=requested,
        )
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` → float32 on CPU, bfloat16 on CUDA when supported (else float16).

    Also accepts ``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``.
    """
    name = dtype.strip().lower()
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in _DTYPES:
        raise ModelLoadError(
            f"unknown dtype '{dtype}' (expected auto, {', '.join(_DTYPES)})", dtype=dtype
        )
    return _DTYPES[name]


def load_model(
    name_or_path: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its fast tokenizer, frozen and in eval mode, on ``device``."""
    start = time.perf_counter()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # unannotated upstream
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    _check_local_folder(name_or_path)
    config = _call(name_or_path, "config", AutoConfig.from_pretrained, trust_remote_code)
    arch = spec_for_model_type(str(config.model_type))
    tokenizer = _load_tokenizer(name_or_path, trust_remote_code)
    model = _call(
        name_or_path,
        "model weights",
        AutoModelForCausalLM.from_pretrained,
        trust_remote_code,
        config=config,
        dtype=dt,
    )
    model = _prepare_model(model, dev, name_or_path)
    _check_vocab_fits(model, tokenizer, name_or_path)
    _align_pad_token(model, tokenizer)
    seconds = time.perf_counter() - start
    log.info(
        "model_loaded",
        name_or_path=name_or_path,
        model_type=arch.model_type,
        seconds=round(seconds, 3),
        params=sum(p.numel() for p in model.parameters()),
        device=str(dev),
        dtype=str(dt).removeprefix("torch."),
    )
    return LoadedModel(model, tokenizer, dev, dt, arch, name_or_path, seconds)


# --- steps ---------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else is meant as a folder."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _check_local_folder(name_or_path: str) -> None:
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path {path} is not a folder", path=str(path))
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {path} has no config.json", path=str(path))
    elif _looks_like_path(name_or_path):
        raise ModelLoadError(f"model folder {path} does not exist", path=str(path))


def _one_line(exc: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _call(name_or_path: str, what: str, fn: Any, trust_remote_code: bool, **kwargs: Any) -> Any:
    """Call a ``from_pretrained`` and turn its failures into a one-line ModelLoadError."""
    try:
        return fn(name_or_path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0")
        hint = (
            ""
            if Path(name_or_path).expanduser().exists()
            else (f" (not a local folder and not in the local HF cache; HF_HUB_OFFLINE={offline})")
        )
        raise ModelLoadError(
            f"could not load {what} from '{name_or_path}'{hint}: {_one_line(e)}",
            path=name_or_path,
            missing=what,
        ) from e


def _load_tokenizer(name_or_path: str, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    tokenizer: PreTrainedTokenizerBase = _call(
        name_or_path, "tokenizer", AutoTokenizer.from_pretrained, trust_remote_code
    )
    if not tokenizer.is_fast:
        raise ModelLoadError(
            f"tokenizer in '{name_or_path}' ({type(tokenizer).__name__}) is not a fast "
            "tokenizer; editd needs character offsets (save a tokenizer.json)",
            path=name_or_path,
        )
    if not tokenizer("hello world", add_special_tokens=False)["input_ids"]:
        raise ModelLoadError(
            f"tokenizer in '{name_or_path}' has an empty vocabulary "
            "(no tokenizer.json or vocab files in the folder?)",
            path=name_or_path,
        )
    _ensure_pad_token(tokenizer, name_or_path)
    tokenizer.padding_side = "left"
    return tokenizer


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, name_or_path: str) -> None:
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise ModelLoadError(
            f"tokenizer in '{name_or_path}' has neither a pad nor an eos token; add a pad "
            "token to the model folder (editd never resizes embeddings)",
            path=name_or_path,
        )
    tokenizer.pad_token = tokenizer.eos_token
    log.debug("pad_token_defaulted", name_or_path=name_or_path, pad_token=tokenizer.pad_token)


def _prepare_model(model: Any, device: torch.device, name_or_path: str) -> PreTrainedModel:
    try:
        model = model.to(device)
    except RuntimeError as e:  # out of memory, usually
        raise ModelLoadError(
            f"could not move model '{name_or_path}' to {device}: {_one_line(e)}",
            path=name_or_path,
            device=str(device),
        ) from e
    model.eval()
    model.requires_grad_(False)
    prepared: PreTrainedModel = model
    return prepared


def _check_vocab_fits(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name_or_path: str
) -> None:
    weight = model.get_input_embeddings().weight
    rows = int(weight.shape[0]) if isinstance(weight, torch.Tensor) else 0
    if len(tokenizer) > rows:
        raise ModelLoadError(
            f"tokenizer in '{name_or_path}' has {len(tokenizer)} tokens but the model's "
            f"embedding has only {rows} rows",
            path=name_or_path,
        )


def _align_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Tell generate() which id pads (it would otherwise warn on every call)."""
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
