"""Versions of a virtual environment: print editd's direct dependencies, or write the lock.

    python .ci/freeze.py versions          # the direct dependencies as installed (a table)
    python .ci/freeze.py lock PATH         # every installed package, pinned, into PATH

Run it with the environment's own interpreter (``.venv-latest/bin/python``). The lock
is a pip constraints file (``pip install -c PATH ...``): every distribution the
environment holds except editd itself, at the exact version installed. A local
version label (``torch==2.13.0+cpu``) is dropped so that the pin also matches the
same release from another index: which torch *build* to install is the Makefile's
``TORCH_SPEC``, which always goes first.
"""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

PROJECT = "editd"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """Canonical distribution name -> version, for every distribution but editd and pip's own."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = _canonical(dist.metadata["Name"] or "")
        if name and name not in {PROJECT, "pip", "setuptools", "wheel"}:
            found[name] = dist.version
    return found


def direct_dependencies() -> list[str]:
    """The canonical names editd's metadata requires (runtime and ``dev`` extras)."""
    names: list[str] = []
    for requirement in metadata.requires(PROJECT) or []:
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
        if match and _canonical(match.group(0)) not in names:
            names.append(_canonical(match.group(0)))
    return names


def versions() -> str:
    have = installed()
    rows = [f"{name:24} {have.get(name, '(not installed)')}" for name in direct_dependencies()]
    return "\n".join([f"{'package':24} version", *rows])


def lock_text() -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    header = [
        "# The versions editd's suite last passed with: a pip constraints file.",
        "# make install applies it (pip install -c deploy/requirements.lock -e '.[dev]');",
        "# pyproject.toml's ranges say what is supported, this file what is tested.",
        "# Refresh: make test-latest && make lock  (then make test, and commit this file).",
        f"# Written {stamp} by .ci/freeze.py from {Path(sys.prefix).name}, Python "
        f"{sys.version_info.major}.{sys.version_info.minor}.",
    ]
    pins = [f"{name}=={version.split('+', 1)[0]}" for name, version in sorted(installed().items())]
    return "\n".join([*header, *pins]) + "\n"


def main(argv: list[str]) -> int:
    if argv[:1] == ["versions"] and len(argv) == 1:
        sys.stdout.write(versions() + "\n")
        return 0
    if argv[:1] == ["lock"] and len(argv) == 2:
        target = Path(argv[1])
        tmp = target.with_suffix(".tmp")
        tmp.write_text(lock_text())
        tmp.replace(target)
        sys.stdout.write(f"wrote {target} ({len(installed())} pins)\n")
        return 0
    sys.stderr.write(__doc__ or "")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
