"""Small helpers shared by the daemon benchmarks: percentiles, machine info, tables, JSON."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DEFAULT_MODEL = REPO / "var" / "worlds" / "small-llama"
DEFAULT_EDITS = REPO / "var" / "evals" / "world-cf-1000.jsonl"


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """n, mean, p50, p95, p99 and max of ``values`` (None for an empty list)."""

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, digits)

    return {
        "n": len(values),
        "mean": r(sum(values) / len(values)) if values else None,
        "p50": r(percentile(values, 50)),
        "p95": r(percentile(values, 95)),
        "p99": r(percentile(values, 99)),
        "max": r(max(values)) if values else None,
    }


def machine_info() -> dict[str, Any]:
    """Where and when a result was measured (the machine is shared: figures are noisy)."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        load = []
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads_daemon": 1,
        "loadavg_at_end": load,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats rounded, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(out: Path, name: str, result: dict[str, Any]) -> Path:
    """Write ``result`` as ``out/name`` (indented JSON); the path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return path


def cli_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """A benchmark's command-line options for its JSON (paths as text; not work/out)."""
    return {
        k: str(v) if isinstance(v, Path) else v
        for k, v in vars(args).items()
        if k not in ("work", "out")
    }


def result_header(benchmark: str, args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """The fields every daemon benchmark's JSON starts with (its ``run`` is added by the caller)."""
    return {
        "benchmark": benchmark,
        "model": args.model.name,
        "edits_file": str(args.edits),
        "parameters": cli_parameters(args),
        "machine": machine_info(),
        "command": " ".join([f".venv/bin/python -m bench.{benchmark}", *argv]),
    }


def run_model_benchmark(
    benchmark: str,
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    table: Callable[[dict[str, Any]], str],
    name: Callable[[argparse.Namespace], str],
) -> dict[str, Any]:
    """The main of a one-model benchmark (``--model``, ``--backend``, ``--out``): one
    torch thread, warnings only, ``run``, print ``table``, write ``out/name(args)``."""
    from daemon.log import configure_logging
    from store.schema import Backend

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    Backend(args.backend)
    torch.set_num_threads(1)
    configure_logging("warning", "console")
    result = {
        "benchmark": benchmark,
        "model": args.model.name,
        "machine": machine_info(),
        "command": " ".join([f".venv/bin/python -m bench.{benchmark}", *argv]),
        **run(args),
    }
    print(table(result))
    print(f"wrote {write_result(args.out, name(args), result)}")
    return result
