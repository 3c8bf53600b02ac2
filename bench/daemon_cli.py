"""The command line the daemon load benchmarks share (``bench.load``, ``bench.soak``,
``bench.completions_load``): the options they all take, and the end of their ``main``.

A benchmark builds its parser with :func:`base_parser` (``--model``, ``--edits``), adds its own
options and hands over to :func:`run_main`, which adds ``--seed``, ``--work``, ``--out``
and ``--tag`` (so they stay last in ``--help`` and in the JSON's ``parameters``), empties
the work folder, runs, prints the table and writes ``<stem>[-<tag>].json``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.stats import DEFAULT_EDITS, DEFAULT_MODEL, REPO, RESULTS, result_header, write_result


def base_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser described by the first line of ``doc``, with ``--model`` and ``--edits``."""
    out = argparse.ArgumentParser(description=doc.split("\n")[0] if doc else None)
    out.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    out.add_argument("--edits", type=Path, default=DEFAULT_EDITS)
    return out


def run_main(
    parser: argparse.ArgumentParser,
    benchmark: str,
    stem: str,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    print_table: Callable[[dict[str, Any]], None],
    argv: Sequence[str] | None,
) -> int:
    """Add the common trailing options (``--work`` defaults to ``var/bench/<benchmark>``
    with dashes), parse ``argv``, empty ``--work``, run, print the table and write the
    result header plus ``"run": run(args)`` to ``--out`` as ``<stem>[-<tag>].json``
    (``stem`` formatted with ``model``, the model folder's name, and ``backends``)."""
    parser.add_argument("--seed", type=int, default=0)
    work = REPO / "var" / "bench" / benchmark.replace("_", "-")
    parser.add_argument("--work", type=Path, default=work)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    result = {**result_header(benchmark, args, argv), "run": run(args)}
    print()
    print_table(result)
    tag = f"-{args.tag}" if args.tag else ""
    name = stem.format(model=args.model.name, backends=args.backends)
    path = write_result(args.out, f"{name}{tag}.json", result)
    print(f"\nwrote {path}")
    return 0
