"""Importing a GGUF file (llama.cpp's format) into an ordinary Hugging Face model folder.

transformers reads GGUF (``from_pretrained(folder, gguf_file=name)``, with the
``gguf`` package) and dequantises every tensor, which takes tens of seconds on a
CPU for a 135 M model. :func:`import_gguf` does it once and saves the result as a
safetensors folder that later loads take seconds to read:

- the folder is written beside its target under a hidden name, fsynced, and
  renamed into place (an existing folder is replaced only with ``overwrite``), so
  a crash leaves the old folder or the new one, never half of one;
- ``editd-import.json`` in it records the source (path, size, sha256), the dtype,
  the architecture, the parameter count, the library versions and the sha256 of
  every file written;
- :func:`cached_import` keeps one folder per (source sha256, dtype) under a cache
  folder, for ``[model] name_or_path = "path/to/model.gguf"``.

The architecture is checked against :mod:`daemon.model.arch` before any weight is
read, so an unsupported model fails in a second, not after the dequantisation.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import structlog
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from daemon.errors import ModelImportError
from daemon.files import fsync_dir, open_private, sha256_file, swap_folder
from daemon.model.arch import spec_for_model_type

log = structlog.get_logger()

MANIFEST = "editd-import.json"
GGUF_MAGIC = b"GGUF"
IMPORT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class ImportManifest:
    """What ``editd-import.json`` holds."""

    source: str
    source_bytes: int
    source_sha256: str
    dtype: str
    model_type: str
    parameters: int
    seconds: float
    imported_at: float
    versions: dict[str, str]
    files: dict[str, str]  # file name -> sha256

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic."""
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_manifest(folder: Path) -> ImportManifest | None:
    """The manifest of an imported folder (None: not an import, or unreadable)."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        return ImportManifest(**data)
    except (OSError, ValueError, TypeError):
        return None


def import_gguf(
    source: Path, out: Path, *, dtype: str = "float32", overwrite: bool = False
) -> ImportManifest:
    """Dequantise ``source`` into the Hugging Face folder ``out`` (see the module doc)."""
    source, out = Path(source), Path(out)
    torch_dtype = _check_request(source, out, dtype, overwrite)
    started = time.monotonic()
    source_sha = sha256_file(source)
    folder, name = str(source.parent), source.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # gguf missing, a GGUF transformers cannot map, ...
        raise ModelImportError(_why(source, exc), path=str(source)) from exc
    spec_for_model_type(str(config.model_type))  # unsupported: fail before the weights
    log.info("gguf_import_started", source=str(source), model_type=config.model_type)
    try:
        read = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as exc:
        raise ModelImportError(_why(source, exc), path=str(source)) from exc
    model = _plain_copy(read, torch_dtype)
    del read
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.importing-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: sha256_file(p, fsync=True) for p in sorted(tmp.iterdir())}
        manifest = ImportManifest(
            source=str(source.resolve()),
            source_bytes=source.stat().st_size,
            source_sha256=source_sha,
            dtype=dtype,
            model_type=str(config.model_type),
            parameters=sum(p.numel() for p in model.parameters()),
            seconds=round(time.monotonic() - started, 2),
            imported_at=time.time(),
            versions=_versions(),
            files=files,
        )
        text = json.dumps(manifest.to_json(), indent=1) + "\n"
        (tmp / MANIFEST).write_text(text, encoding="utf-8")
        fsync_dir(tmp)
        swap_folder(tmp, out, old)
    except OSError as exc:
        raise ModelImportError(f"could not write '{out}': {exc}", path=str(out)) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    log.info(
        "gguf_imported",
        source=str(source),
        out=str(out),
        model_type=manifest.model_type,
        parameters=manifest.parameters,
        dtype=dtype,
        seconds=manifest.seconds,
    )
    return manifest


def cached_import(source: Path, cache_root: Path, *, dtype: str = "float32") -> Path:
    """The imported folder of ``source`` under ``cache_root``, imported once.

    The folder is named after the file and its sha256, so a changed file is imported
    anew; a file lock serialises two processes importing the same file.
    """
    source = Path(source)
    if not is_gguf(source):
        raise ModelImportError(f"'{source}' is not a GGUF file", path=str(source))
    digest = sha256_file(source)
    folder = Path(cache_root) / f"{source.stem}-{dtype}-{digest[:12]}"
    if _matches(folder, digest, dtype):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(open_private(folder.parent / f".{folder.name}.lock"), "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _matches(folder, digest, dtype):
            import_gguf(source, folder, dtype=dtype, overwrite=True)
    return folder


def _plain_copy(model: Any, dtype: torch.dtype) -> Any:
    """The dequantised weights in a model built from the same config minus its GGUF
    ``quantization_config``: transformers (5.25) refuses to save a model it loaded from
    GGUF, although every tensor is already a plain float tensor."""
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(model.config).from_dict(config_dict)
    plain = cast(Any, AutoModelForCausalLM).from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or ())
    if unexpected or set(missing) - tied:
        raise ModelImportError(
            f"the GGUF's tensors do not fill a {config.model_type} model "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    plain.generation_config = model.generation_config
    plain.eval()
    return plain


def _matches(folder: Path, digest: str, dtype: str) -> bool:
    manifest = read_manifest(folder)
    return manifest is not None and manifest.source_sha256 == digest and manifest.dtype == dtype


def _check_request(source: Path, out: Path, dtype: str, overwrite: bool) -> torch.dtype:
    if dtype not in IMPORT_DTYPES:
        raise ModelImportError(
            f"unknown dtype '{dtype}' (expected {', '.join(IMPORT_DTYPES)})", dtype=dtype
        )
    if not source.is_file():
        raise ModelImportError(f"'{source}' is not a file", path=str(source))
    if not is_gguf(source):
        raise ModelImportError(
            f"'{source}' is not a GGUF file (it does not start with 'GGUF')", path=str(source)
        )
    if out.exists() and not overwrite:
        raise ModelImportError(
            f"'{out}' already exists (pass --force to replace it)", path=str(out)
        )
    if out.exists() and not out.is_dir():
        raise ModelImportError(f"'{out}' exists and is not a folder", path=str(out))
    return IMPORT_DTYPES[dtype]


def _why(source: Path, exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:300]
    if isinstance(exc, ImportError) or ("gguf" in text.lower() and "install" in text.lower()):
        return f"reading '{source}' needs the gguf package (pip install gguf): {text}"
    return f"transformers could not read '{source}': {type(exc).__name__}: {text}"


def _versions() -> dict[str, str]:
    found: dict[str, str] = {}
    for name in ("transformers", "gguf", "torch"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
