"""Only daemon/model/arch.py may spell model module paths (STYLE habit 4).

Everything else asks ``daemon.model.arch`` for paths by role, so supporting a new
architecture touches one table. The test has teeth in both directions: it must
find every pattern in arch.py (so a renamed pattern list cannot go stale) and
must flag a planted offender.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

FORBIDDEN = (
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    ".mlp.c_proj",
    "c_proj",
    "down_proj",
    "up_proj",
    "gate_proj",
    "dense_4h_to_h",
    "dense_h_to_4h",
    "fc_out",
    "fc_in",
    "embed_tokens",
)
# Whole identifiers only ("transformer.head_mask", "fc_input" do not count), but attribute
# access such as ``self.model.layers[i]`` does: it hard-codes the layout just the same.
_PATTERNS = {
    s: re.compile(("" if s.startswith(".") else r"(?<!\w)") + re.escape(s) + r"(?!\w)")
    for s in FORBIDDEN
}
ALLOWED = Path("daemon/model/arch.py")


def offenders(text: str) -> list[str]:
    """The forbidden module-path strings that occur in ``text``."""
    return sorted(s for s, pattern in _PATTERNS.items() if pattern.search(text))


def _scanned_files(repo_root: Path) -> list[Path]:
    files = [p for pkg in ("daemon", "store") for p in (repo_root / pkg).rglob("*.py")]
    return sorted(p for p in files if p.relative_to(repo_root) != ALLOWED)


def find_offenders(root: Path) -> dict[str, list[str]]:
    """File (relative to ``root``) → forbidden strings, for every offending file."""
    return {
        str(p.relative_to(root)): hits
        for p in _scanned_files(root)
        if (hits := offenders(p.read_text(encoding="utf-8")))
    }


def test_no_module_outside_arch_spells_a_module_path(repo_root: Path) -> None:
    """No .py under daemon/ or store/ other than arch.py names a module path."""
    found = find_offenders(repo_root)
    assert not found, f"ask daemon.model.arch for these paths instead: {found}"


def test_a_planted_offender_is_found(tmp_path: Path) -> None:
    """The file walk reports an offender in a nested package and exempts only arch.py."""
    (tmp_path / "daemon" / "editors" / "hook").mkdir(parents=True)
    (tmp_path / "daemon" / "model").mkdir(parents=True)
    (tmp_path / "store").mkdir()
    bad = "w = model.model.layers[3].mlp.down_proj.weight\n"
    (tmp_path / "daemon" / "editors" / "hook" / "layer.py").write_text(bad, encoding="utf-8")
    (tmp_path / "daemon" / "model" / "arch.py").write_text(bad, encoding="utf-8")
    (tmp_path / "store" / "db.py").write_text("PATH = 'var/editd.sqlite3'\n", encoding="utf-8")
    assert find_offenders(tmp_path) == {
        "daemon/editors/hook/layer.py": ["down_proj", "model.layers"]
    }


def test_the_scan_covers_the_packages(repo_root: Path) -> None:
    """The scan sees real files (a wrong root would pass vacuously)."""
    scanned = {str(p.relative_to(repo_root)) for p in _scanned_files(repo_root)}
    assert "daemon/errors.py" in scanned
    assert "daemon/model/loading.py" in scanned
    assert str(ALLOWED) not in scanned


def test_arch_itself_spells_every_pattern(repo_root: Path) -> None:
    """Each forbidden string really is a path arch.py knows, so the list stays honest."""
    text = (repo_root / ALLOWED).read_text(encoding="utf-8")
    assert offenders(text) == sorted(FORBIDDEN)


@pytest.mark.parametrize(
    ("source", "hits"),
    [
        ('get_submodule(f"model.layers.{i}.mlp.down_proj")', ["down_proj", "model.layers"]),
        ("names = ['transformer.h.3.mlp.c_proj']", [".mlp.c_proj", "c_proj", "transformer.h"]),
        ('target_modules=["fc_out"]', ["fc_out"]),
        ("x = self.transformer.head_mask; y = data.fc_input", []),
        ("arch.module_path(model, 'mlp_out', i)", []),
    ],
)
def test_offenders_detects_planted_paths(source: str, hits: list[str]) -> None:
    """The matcher flags real paths and leaves look-alike identifiers alone."""
    assert offenders(source) == hits
