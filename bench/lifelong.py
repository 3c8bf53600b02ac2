"""Lifelong editing quality over a grid: editors x edit counts x models x edit sets.

Each run is one ``editd eval`` subprocess (its own process, so ``peak_rss_mb`` is the
run's own): the largest requested edit count of the grid, scored at every requested
count as a checkpoint of that one stream. Its report goes to
``<results>/lifelong/<model>/<editor>-<n>/`` (real text: ``<editor>-<data>-<n>``) with
``run.json`` (command, wall time, where the report came from) and ``eval.log``. All
reports found there are merged into ``<results>/lifelong.json``; one Markdown table per
model and edit set is printed and one PNG per metric is drawn (``bench/plots.py``).

Edit sets: ``world`` (counterfactual edits drawn from the world model by
``daemon.world.editsets``; at most one per fact of the world's edit split, so a request
past that is capped at the maximum, and the cap is recorded), ``counterfact`` and
``zsre`` (the files under ../shared/data, converted by ``daemon.eval.loaders``).

    .venv/bin/python -m bench.lifelong                       # the whole grid
    .venv/bin/python -m bench.lifelong --models small-llama --editors melo,ft --n 10,100,1000
    .venv/bin/python -m bench.lifelong --resume \
        --reuse bench/results/eval-hook-1000-b10-small-llama.json
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import plots
from daemon.log import configure_logging

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SHARED_DATA = REPO.parent / "shared" / "data"
# The `editd eval --editor` choices this grid runs; auto: the daemon's routing, verification
# and escalation (daemon/engine/dispatch.py) over hook and MELO, its counts under "routing".
EVAL_EDITORS = ("hook", "melo", "ft", "auto")
UNAVAILABLE: dict[str, str] = {}  # editor -> why this grid cannot run it
BATCH_SIZE = {"ft": 1, "hook": 10, "melo": 10, "auto": 10}  # ft: the sequential baseline
DATA = {
    "world": None,
    "counterfact": ("counterfact", Path("counterfact/counterfact-edit.json")),
    "zsre": ("zsre", Path("zsre/zsre_mend_edit.json")),
}
# Edit files the earlier BENCHMARKS.md runs used (seed 0), reused while they are long enough.
KNOWN_EDITS = {"small-llama": Path("var/evals/world-cf-1000.jsonl")}
HOOK_CONFIGS = {  # bench/hook.toml: layers [2, 3], prompt_last
    "small-llama": REPO / "bench" / "hook.toml",
    "medium-llama": REPO / "bench" / "hook.toml",
    "small-gpt2": REPO / "bench" / "hook.toml",  # what `editd locate` picks for it too
    "medium-gpt2": REPO / "bench" / "hook.toml",
}
HOOKED = ("hook", "auto")  # editors that build the hook back-end (and take its config)


@dataclass(frozen=True)
class Run:
    """One ``editd eval`` stream."""

    model: str
    model_dir: Path
    editor: str
    data: str
    edits: Path
    fmt: str
    n: int
    checkpoints: tuple[int, ...]
    batch_size: int
    config: Path | None
    capped_from: int | None = None  # the requested largest count, when the set is smaller

    @property
    def name(self) -> str:
        middle = "" if self.data == "world" else f"-{self.data}"
        return f"{self.editor}{middle}-{self.n}"

    @property
    def run_id(self) -> str:
        return f"{self.model}/{self.name}"

    def out_dir(self, root: Path) -> Path:
        return root / self.model / self.name

    def command(self, out_dir: Path) -> list[str]:
        head = [sys.executable, "-m", "daemon.cli"]
        if self.config is not None:
            head += ["--config", str(self.config)]
        return [
            *head,
            "eval",
            *("--model", str(self.model_dir), "--editor", self.editor),
            *("--edits", str(self.edits), "--format", self.fmt, "--n", str(self.n)),
            *("--checkpoints", ",".join(str(c) for c in self.checkpoints)),
            *("--batch-size", str(self.batch_size), "--out", str(out_dir), "--quiet"),
        ]


# --- edit sets ----------------------------------------------------------------------------


def count_lines(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def world_edit_file(model_dir: Path, model: str, n: int, edits_dir: Path) -> tuple[Path, int]:
    """An edit file of the world with at least ``min(n, available)`` edits; and its size.

    Reuses a known or earlier file when one is long enough, else draws a new set
    (seed 0); past the facts that qualify it draws them all (the error names the count).
    """
    candidates = [KNOWN_EDITS[model]] if model in KNOWN_EDITS else []
    candidates += sorted(edits_dir.glob(f"{model}-cf-*.jsonl"))
    sized = sorted((count_lines(p), p) for p in candidates if p.is_file())
    for size, path in sized:
        if size >= n:
            return path, size
    if sized and sized[-1][1].name.endswith("-max.jsonl"):
        return sized[-1][1], sized[-1][0]  # already every fact that qualifies
    from daemon.errors import WorldError
    from daemon.model.loading import load_model
    from daemon.world.editsets import counterfactual_edits, write_jsonl

    loaded = load_model(str(model_dir), device="cpu", dtype="float32")
    try:
        records = counterfactual_edits(model_dir, loaded.model, loaded.tokenizer, n, seed=0)
        path = edits_dir / f"{model}-cf-{n}.jsonl"
    except WorldError as e:
        found = re.search(r"only (\d+) facts qualify", str(e))
        if found is None:
            raise
        records = counterfactual_edits(
            model_dir, loaded.model, loaded.tokenizer, int(found.group(1)), seed=0
        )
        path = edits_dir / f"{model}-cf-max.jsonl"
    write_jsonl(path, records)
    print(f"wrote {len(records)} edits to {path}", flush=True)
    return path, len(records)


def real_text_size(path: Path, fmt: str) -> int:
    from daemon.eval.loaders import convert

    return len(convert(path, fmt).requests)


# --- planning -----------------------------------------------------------------------------


def resolve_model(spec: str, worlds: Path) -> tuple[str, Path]:
    """A model name (a folder under ``worlds``) or a path: its name and folder."""
    path = Path(spec)
    if not path.is_dir():
        path = worlds / spec
    return path.name, path


def selected(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(key, pat) for pat in patterns)


def edit_set(model: str, model_dir: Path, data: str, top: int, args: Any) -> tuple[Path, str, int]:
    """The edit file, its format and how many edits it holds (at least ``top`` if it can)."""
    source = DATA[data]
    if source is None:
        path, size = world_edit_file(model_dir, model, top, args.edits_dir)
        return path, "editd", size
    fmt, rel = source
    path = args.shared_data / rel
    return path, fmt, real_text_size(path, fmt) if path.is_file() else 0


def plan(args: argparse.Namespace) -> tuple[list[Run], list[dict[str, str]]]:
    """The runs of the grid, and the combinations that cannot run (with why)."""
    runs: list[Run] = []
    skipped = [{"id": f"*/{e}", "reason": UNAVAILABLE[e]} for e in args.editors if e in UNAVAILABLE]
    ns = sorted(set(args.n))
    args.edits_dir.mkdir(parents=True, exist_ok=True)
    for spec in args.models:
        model, model_dir = resolve_model(spec, args.worlds)
        if not (model_dir / "config.json").is_file():
            skipped.append({"id": f"{model}/*", "reason": f"no model at {model_dir}"})
            continue
        for data in args.data:
            mid = "" if data == "world" else f"-{data}"
            chosen = [
                e
                for e in args.editors
                if e not in UNAVAILABLE and selected(f"{model}/{e}{mid}", args.only)
            ]
            if not chosen:
                continue
            edits, fmt, size = edit_set(model, model_dir, data, ns[-1], args)
            if size == 0:
                skipped.append({"id": f"{model}/*{mid}", "reason": f"no edits in {edits}"})
                continue
            top = min(ns[-1], size)
            marks = tuple(sorted({min(n, top) for n in ns}))
            capped = ns[-1] if top < ns[-1] else None
            for e in chosen:
                config = args.config
                if e in HOOKED:
                    config = dict(args.hook_config).get(model, HOOK_CONFIGS.get(model, config))
                batch = args.batch_size or BATCH_SIZE[e]
                run = Run(model, model_dir, e, data, edits, fmt, top, marks, batch, config, capped)
                runs.append(run)
    return runs, skipped


# --- running ------------------------------------------------------------------------------


def reusable(run: Run, report: dict[str, Any]) -> bool:
    """Does an existing eval report answer ``run`` (same stream, checkpoints it needs)?"""
    settings = report.get("settings", {})
    marks = {c["edits"] for c in report.get("checkpoints", [])}
    same_edits = Path(report.get("data", {}).get("edits", "")).resolve() == run.edits.resolve()
    return (
        report.get("editor") == run.editor
        and Path(report.get("model", "")).resolve() == run.model_dir.resolve()
        and report.get("n_edits") == run.n
        and same_edits
        and settings.get("batch_size") == run.batch_size
        and not settings.get("send_rephrases", False)
        and set(run.checkpoints) <= marks
    )


def adopt(run: Run, source: Path, out_dir: Path) -> None:
    """Copy a matching earlier report into the run's folder (with its Markdown and plot)."""
    from daemon.eval.harness import CheckpointScores
    from daemon.eval.report import EvalReport, write_report

    data = json.loads(source.read_text(encoding="utf-8"))
    report = EvalReport(
        editor=data["editor"],
        model=data["model"],
        n_edits=data["n_edits"],
        checkpoints=tuple(CheckpointScores(**c) for c in data["checkpoints"]),
        settings=data.get("settings", {}),
        data=data.get("data", {}),
    )
    write_report(report, out_dir)
    shutil.copyfile(source, out_dir / "report.json")  # byte for byte, as measured


def _env() -> dict[str, str]:
    """This checkout's code first, whatever the venv's editable install points at."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}


def execute(run: Run, root: Path, reuse: Sequence[Path]) -> dict[str, Any]:
    """Run (or adopt) one stream; returns what goes into ``run.json``."""
    out_dir = run.out_dir(root)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"id": run.run_id, "data": run.data, "capped_from": run.capped_from}
    for source in reuse:
        if reusable(run, json.loads(source.read_text(encoding="utf-8"))):
            adopt(run, source, out_dir)
            print(f"[{run.run_id}] reused {source}", flush=True)
            return {**meta, "source": f"reused {source}", "command": None, "returncode": 0}
    command = run.command(out_dir)
    print(f"[{run.run_id}] {' '.join(command[1:])}", flush=True)
    t0 = time.perf_counter()
    with (out_dir / "eval.log").open("w", encoding="utf-8") as log:
        done = subprocess.run(command, env=_env(), stdout=log, stderr=log, check=False)
    wall = round(time.perf_counter() - t0, 1)
    print(f"[{run.run_id}] exit {done.returncode} after {wall} s", flush=True)
    meta.update(source="run", command=command, returncode=done.returncode, wall_s=wall)
    return meta


def run_entry(out_dir: Path, root: Path) -> dict[str, Any] | None:
    """One merged entry: the report plus ``run.json`` (None: no report there)."""
    path = out_dir / "report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text(encoding="utf-8"))
    meta_path = out_dir / "run.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    model = out_dir.parent.name
    return {
        "id": f"{model}/{out_dir.name}",
        "model": model,
        "editor": report["editor"],
        "data": meta.get("data", "world"),
        "n_edits": report["n_edits"],
        "batch_size": report.get("settings", {}).get("batch_size"),
        "source": meta.get("source", "run"),
        "capped_from": meta.get("capped_from"),
        "routing": (report["checkpoints"][-1].get("routing") if report["checkpoints"] else None),
        "wall_s": meta.get("wall_s"),
        "path": str(path.relative_to(root.parent) if path.is_relative_to(root.parent) else path),
        "report": report,
    }


def merge(root: Path, skipped: Sequence[dict[str, str]], failed: Sequence[str]) -> dict[str, Any]:
    """Every run report under ``root``, in one JSON document."""
    entries = [run_entry(d, root) for d in sorted(root.glob("*/*")) if d.is_dir()]
    import torch

    return {
        "version": 1,
        "benchmark": "lifelong",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "runs": [e for e in entries if e is not None],
        "not_run": list(skipped),
        "failed": list(failed),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }


# --- CLI ------------------------------------------------------------------------------------


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _ints(value: str) -> list[int]:
    try:
        out = [int(v) for v in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated integers") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError("expected positive edit counts")
    return out


def _pair(value: str) -> tuple[str, Path]:
    model, sep, path = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError("expected MODEL=PATH")
    return model, Path(path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--models", type=_csv, default=["small-llama", "small-gpt2"])
    p.add_argument("--editors", type=_csv, default=list(EVAL_EDITORS))
    p.add_argument("--n", type=_ints, default=[10, 100, 1000, 10000])
    p.add_argument("--data", type=_csv, default=list(DATA), help="world,counterfact,zsre")
    p.add_argument(
        "--only", type=_csv, default=["*"], help="globs over MODEL/EDITOR[-DATA], e.g. */melo"
    )
    p.add_argument("--resume", action="store_true", help="skip runs whose report exists")
    p.add_argument("--reuse", type=Path, nargs="*", default=[], help="earlier eval reports")
    p.add_argument("--batch-size", type=int, default=0, help="0: per editor (ft 1, else 10)")
    p.add_argument("--config", type=Path, default=None, help="editd config (default: built in)")
    p.add_argument("--hook-config", type=_pair, action="append", default=[])
    p.add_argument("--worlds", type=Path, default=Path("var/worlds"))
    p.add_argument("--edits-dir", type=Path, default=Path("var/evals/lifelong"))
    p.add_argument("--shared-data", type=Path, default=SHARED_DATA)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--dry-run", action="store_true", help="print the plan only")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_logging("warning", "console")
    for name in (*args.editors, *args.data):
        if name not in (*EVAL_EDITORS, *UNAVAILABLE, *DATA):
            raise SystemExit(f"unknown editor or edit set {name!r}")
    root = args.results / "lifelong"
    runs, skipped = plan(args)
    failed: list[str] = []
    for run in runs:
        done = (run.out_dir(root) / "report.json").is_file()
        if args.dry_run or (args.resume and done):
            print(f"[{run.run_id}] {'exists' if done else 'planned'}", flush=True)
            continue
        meta = execute(run, root, args.reuse)
        (run.out_dir(root) / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
        if meta["returncode"] != 0:
            failed.append(run.run_id)
    for item in skipped:
        print(f"not run: {item['id']}: {item['reason']}", flush=True)
    if args.dry_run:
        return 0
    merged = merge(root, skipped, failed)
    out = args.results / "lifelong.json"
    out.write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
    print(plots.markdown_tables(merged["runs"]))
    pngs = plots.draw_metrics(merged["runs"], args.results)
    print(f"wrote {out} and {len(pngs)} plots ({args.results}/lifelong-<metric>.png)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
