"""What an edit costs: time per phase, covariance statistics, memory and disk per edit.

Editors are built as the daemon builds them (``build_editor`` on a loaded model, the
config ``--config`` with the hook at ``--hook-layers`` (2,3), prompt-last keys, as
BENCHMARKS.md evaluates it; MELO calibrated on the world's drift probes), in this
process, without the daemon's queue. Each batch is applied and every accepted edit
verified by greedy generation through ``Engine.verify``, as the worker does (a failed
one is retracted, except on ``ft``: see ``stream``). The phases are timed from the
outside (``bench.phases``: library functions wrapped with timers while the benchmark
runs; exclusive times, so they sum to the wall time).

``--stage phases``: per back-end and batch size, a fresh editor, one untimed warm-up
batch (edits from the end of the pool), then ``--n`` edits timed: seconds per edit in
each phase. hook: keys (site encoding and the solve loop's key reads), targets (v*),
solve (residual spread, running sums, collapse guard), solve_linalg (the float64
closed-form solves), gate (key references, subject index), recall check, rollback
copy; melo: checks, keys, training, index (insert, reroute check, copy), the
editor's own verification; all: verify (the worker's), retract (of failed edits),
apply_other (the rest of ``apply``: validation, bookkeeping). ``--rounds`` repeats
every run, interleaved; medians.

``--stage covariance``: the hook's ``C = E[k k^T]`` at each ``--budgets`` token count
(computed, not cached; a budget past the corpus reads it again, for timing), and the
cache (``cached_covariance``) at the configured budget: first call (compute and save),
second call (reuse).

``--stage scale``: per back-end, one editor taking ``max(--sizes)`` edits (batches of
``--batch-size``); at each size: RSS growth since the editor was built (also after
``malloc_trim``: without the allocator's free lists), the bytes of ``state_dict``'s
tensors, ``save`` (the checkpoint's editor part: folder size, seconds) and ``load``
seconds, and the counts and phases per edit over the window of edits since the
previous size (``window_*``). Slopes (per 1,000 live edits) are least-squares fits
over the sizes.

The world's edit split gives ~1,036 counterfactual edits; past the ``--edits`` file
the pool is topped up from the probe split (``edit_pool``, cached beside the file).

    .venv/bin/python -m bench.cost --stage phases --backends hook,melo,ft
    .venv/bin/python -m bench.cost --stage covariance
    .venv/bin/python -m bench.cost --stage scale --backends hook --sizes 100,1000,2000

Writes ``bench/results/cost-<stage>[-<backends>]-<model>.json`` and prints tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.inference import edit_specs
from bench.phases import (
    PROBES,
    PhaseTimer,
    editor_facts,
    folder_bytes,
    machine,
    measure_state,
    per_edit,
    settled_rss_bytes,
    slope_per_1000,
    stream,
    trimmed_rss_bytes,
)
from daemon.config import Config, load_config
from daemon.editors.base import Editor
from daemon.editors.hook.setup import read_text_source
from daemon.editors.hook.stats import cached_covariance, collect_covariance_counted
from daemon.editors.registry import HOOK, MELO
from daemon.engine.engine import Engine, build_editor
from daemon.log import configure_logging
from daemon.model.loading import LoadedModel, load_model
from daemon.world.editsets import counterfactual_edits, probes_from_world, read_jsonl, write_jsonl
from store.schema import Backend

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
LABEL = {"hook": HOOK, "melo": MELO, "ft": Backend.AUTO}  # Engine's key only
MB = 2**20
STATS = "the store folder: the hook's covariance statistics are cached in its stats/"


# --- setup -------------------------------------------------------------------------------


def cost_config(args: argparse.Namespace) -> Config:
    """``--config`` with the hook at ``--hook-layers``, prompt-last keys (BENCHMARKS.md's
    layout), the store (and so the covariance cache) under ``--stats-home``, and room
    for ``max(--sizes)`` MELO blocks."""
    cfg = load_config(args.config)
    hook = dataclasses.replace(
        cfg.editors.hook, layers=tuple(args.hook_layers), key_position="prompt_last"
    )
    blocks = max(cfg.editors.melo.max_blocks, max(args.sizes) if args.stage == "scale" else 0)
    melo = dataclasses.replace(cfg.editors.melo, max_blocks=blocks)
    editors = cfg.editors.with_sections(hook=hook, melo=melo)
    store = dataclasses.replace(cfg.store, path=args.stats_home / "editd.sqlite3")
    return dataclasses.replace(cfg, editors=editors, store=store)


def edit_pool(edits: Path, n: int, model: Path) -> list[dict[str, Any]]:
    """``n`` edit requests: ``edits`` first, then the world's probe split (ids ``probe-...``),
    generated once into ``<edits stem>+probe<k>.jsonl`` beside ``edits``."""
    records = read_jsonl(edits)
    need = n - len(records)
    if need <= 0:
        return records[:n]
    extra_path = edits.with_name(f"{edits.stem}+probe{need}.jsonl")
    if not extra_path.is_file():
        print(f"drawing {need} more edits from the probe split into {extra_path} ...", flush=True)
        loaded = load_model(str(model))
        extra = counterfactual_edits(model, loaded.model, loaded.tokenizer, need, split="probe")
        for record in extra:
            record["id"] = "probe-" + record["id"]
        write_jsonl(extra_path, extra)
    return records + read_jsonl(extra_path)[:need]


def build(name: str, cfg: Config, model: Path, probes: Sequence[str]) -> tuple[Editor, Engine]:
    loaded: LoadedModel = load_model(str(model), device=cfg.model.device, dtype=cfg.model.dtype)
    editor = build_editor(name, loaded, cfg, calibration_prompts=probes)
    return editor, Engine(loaded, {LABEL[name]: editor})


# --- stages --------------------------------------------------------------------------------


def phase_run(
    name: str, batch: int, args: argparse.Namespace, cfg: Config, probes: Sequence[str]
) -> dict[str, Any]:
    """One fresh editor: an untimed warm-up batch, then ``--n`` edits timed by phase."""
    warm = max(args.warmup, batch)
    pool = edit_specs(edit_pool(args.edits, args.n + warm, args.model))
    timed, warmup = pool[: args.n], pool[-warm:]
    print(f"[{name}] batch {batch}: building, warm-up {warm}, timing {len(timed)} ...", flush=True)
    timer = PhaseTimer()
    with timer.patched(PROBES[name]) as missing:
        t0 = time.perf_counter()
        editor, engine = build(name, cfg, args.model, probes)
        build_s = time.perf_counter() - t0
        stream(editor, engine, warmup, batch, timer)
        timer.reset()
        counts = stream(editor, engine, timed, batch, timer)
    del editor, engine
    gc.collect()
    return {
        "backend": name,
        "batch_size": batch,
        "edits": len(timed),
        "warmup_edits": warm,
        "editor_build_s": round(build_s, 2),
        **{k: v for k, v in counts.items() if k != "wall_s"},
        "total_s": round(counts["wall_s"], 3),
        "s_per_edit": round(counts["wall_s"] / len(timed), 5),
        "phases_s_per_edit": per_edit(timer.snapshot(), len(timed)),
        "phase_calls": dict(sorted(timer.calls.items())),
        "phases_sum_s": round(sum(timer.seconds.values()), 3),
        "unpatched": missing,
    }


def stage_phases(args: argparse.Namespace, cfg: Config, probes: Sequence[str]) -> dict[str, Any]:
    """``--rounds`` interleaved rounds of every (back-end, batch size); medians per phase."""
    sizes = {"hook": args.hook_batch_sizes, "melo": args.melo_batch_sizes}
    sizes["ft"] = args.ft_batch_sizes
    configs = [(name, batch) for name in args.backends for batch in sizes[name]]
    rounds = [[phase_run(n, b, args, cfg, probes) for n, b in configs] for _ in range(args.rounds)]
    runs = []
    for k in range(len(configs)):
        each = [r[k] for r in rounds]
        phases = sorted({p for r in each for p in r["phases_s_per_edit"]})
        median = {
            p: round(statistics.median(r["phases_s_per_edit"].get(p, 0.0) for r in each), 5)
            for p in phases
        }
        run = {**each[0], "phases_s_per_edit": median, "rounds": len(each)}
        for key in ("s_per_edit", "total_s", "phases_sum_s"):
            run[key] = statistics.median(r[key] for r in each)
            run[f"{key}_rounds"] = [r[key] for r in each]
        runs.append(run)
    return {"runs": runs}


def stage_covariance(args: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    hook = cfg.editors.hook
    loaded = load_model(str(args.model), device=cfg.model.device, dtype=cfg.model.dtype)
    texts = read_text_source(hook.covariance_source, loaded.name_or_path)
    layers, model, tok = list(hook.layers), loaded.model, loaded.tokenizer
    corpus = sum(len(ids) for ids in tok(texts)["input_ids"])
    rows = []
    for budget in args.budgets:
        repeats = -(-budget // corpus)  # a budget past the corpus reads it again (timing only)
        print(f"covariance over {budget} tokens ({repeats} x the corpus) ...", flush=True)
        t0 = time.perf_counter()
        reads = texts * repeats
        _, tokens = collect_covariance_counted(
            model, tok, reads, layers, token_budget=budget, progress=False
        )
        seconds = time.perf_counter() - t0
        rows.append({"budget": budget, "tokens": tokens, "corpus_reads": repeats})
        rows[-1].update(seconds=round(seconds, 3), tokens_per_s=round(tokens / seconds))
    cache = args.work / "stats"
    shutil.rmtree(cache, ignore_errors=True)
    timings = []
    for _ in range(2):  # compute and save, then reuse
        t0 = time.perf_counter()
        budget, name = hook.covariance_tokens, loaded.name_or_path
        cached_covariance(cache, model, tok, texts, layers, budget, name, progress=False)
        timings.append(round(time.perf_counter() - t0, 3))
    return {
        "layers": layers,
        "texts": len(texts),
        "corpus_tokens": corpus,
        "budgets": rows,
        "cache": {
            "budget": hook.covariance_tokens,
            "first_call_s": timings[0],
            "reuse_s": timings[1],
            "artefact_mb": round(folder_bytes(cache) / MB, 3),
        },
    }


def scale_one(
    name: str, args: argparse.Namespace, cfg: Config, probes: Sequence[str]
) -> dict[str, Any]:
    sizes = sorted(args.sizes)
    specs = edit_specs(edit_pool(args.edits, sizes[-1], args.model))
    timer = PhaseTimer()
    points = []
    with timer.patched(PROBES[name]) as missing:
        editor, engine = build(name, cfg, args.model, probes)
        rss0_trimmed = trimmed_rss_bytes()
        rss0 = settled_rss_bytes()
        done = 0
        for size in sizes:
            timer.reset()
            print(f"[{name}] edits {done + 1}..{size} ...", flush=True)
            counts = stream(editor, engine, specs[done:size], args.batch_size, timer)
            window = size - done
            done = size
            rss = settled_rss_bytes()
            point = {
                "edits": size,
                "live": len(editor.applied_ids()),
                **{f"window_{k}": v for k, v in counts.items() if k != "wall_s"},
                "window_s_per_edit": round(counts["wall_s"] / window, 5),
                "window_phases_s_per_edit": per_edit(timer.snapshot(), window),
                "rss_bytes": rss,
                "rss_growth_bytes": rss - rss0,
                "rss_trimmed_growth_bytes": trimmed_rss_bytes() - rss0_trimmed,
                **measure_state(editor, args.work / f"state-{name}"),
                "editor": editor_facts(editor),
            }
            points.append(point)
            print(f"[{name}] {size}: {json.dumps({k: point[k] for k in SCALE_COLUMNS})}")
    xs = [float(p["live"]) for p in points]
    slopes = {k: slope_per_1000(xs, [float(p[k]) for p in points]) for k in SCALE_COLUMNS[2:]}
    return {
        "backend": name,
        "points": points,
        "slopes_per_1000_edits": slopes,
        "unpatched": missing,
    }


SCALE_COLUMNS: tuple[str, ...] = ("edits", "live", "window_s_per_edit", "rss_growth_bytes")
SCALE_COLUMNS += ("rss_trimmed_growth_bytes", "state_bytes", "disk_bytes", "save_s", "load_s")


def stage_scale(args: argparse.Namespace, cfg: Config, probes: Sequence[str]) -> dict[str, Any]:
    results = []
    for name in args.backends:
        results.append(scale_one(name, args, cfg, probes))
        gc.collect()
    return {"batch_size": args.batch_size, "sizes": sorted(args.sizes), "backends": results}


# --- report (markdown tables) -------------------------------------------------------------


def table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


def print_phases(result: dict[str, Any]) -> None:
    for name in dict.fromkeys(r["backend"] for r in result["runs"]):
        runs = [r for r in result["runs"] if r["backend"] == name]
        phases = sorted({p for r in runs for p in r["phases_s_per_edit"]})
        rows = [
            [r["batch_size"], f"{r['s_per_edit'] * 1000:.1f}", f"{r['accepted']}/{r['edits']}"]
            + [f"{r['phases_s_per_edit'].get(p, 0.0) * 1000:.1f}" for p in phases]
            for r in runs
        ]
        table([f"{name} batch", "ms/edit", "kept", *phases], rows)
        for r in runs:
            if r["unpatched"]:
                print(f"not timed (gone from the code): {', '.join(r['unpatched'])}")


def print_scale(result: dict[str, Any]) -> None:
    head = ["back-end", "edits", "live", "s/edit", "RSS+ MB", "trimmed", "state MB", "disk MB"]
    rows = [
        [r["backend"], p["edits"], p["live"], f"{p['window_s_per_edit']:.3f}"]
        + [f"{p[k] / MB:.1f}" for k in SCALE_COLUMNS[3:7]]
        + [f"{p['disk_bytes'] / max(1, p['live']) / 1024:.1f}", p["save_s"], p["load_s"]]
        for r in result["backends"]
        for p in r["points"]
    ]
    table([*head, "disk KB/edit", "save s", "load s"], rows)
    for r in result["backends"]:
        slopes = r["slopes_per_1000_edits"]
        cells = [
            f"{k.removesuffix('_bytes')} {v / MB:+.2f} MB"
            if k.endswith("_bytes")
            else f"{k} {v:+.4f}"
            for k, v in slopes.items()
            if v is not None
        ]
        print(f"{r['backend']}, per 1000 more live edits: {', '.join(cells)}")


def print_covariance(result: dict[str, Any]) -> None:
    rows = [
        [r["budget"], r["tokens"], r["corpus_reads"], r["seconds"], r["tokens_per_s"]]
        for r in result["budgets"]
    ]
    table(["budget", "tokens", "corpus reads", "seconds", "tokens/s"], rows)
    c = result["cache"]
    print(
        f"\ncorpus {result['corpus_tokens']} tokens; cache at {c['budget']}: first call "
        f"{c['first_call_s']} s, reuse {c['reuse_s']} s, artefact {c['artefact_mb']} MB"
    )


# --- main -----------------------------------------------------------------------------------


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--stage", choices=("phases", "covariance", "scale"), default="phases")
    parser.add_argument("--model", type=Path, default=Path("var/worlds/small-llama"))
    parser.add_argument("--edits", type=Path, default=Path("var/evals/world-cf-1000.jsonl"))
    parser.add_argument("--config", type=Path, default=Path("bench/hook.toml"))
    parser.add_argument("--stats-home", type=Path, default=Path("var/evals/var"), help=STATS)
    parser.add_argument("--hook-layers", type=ints, default=[2, 3])
    parser.add_argument("--backends", default="hook,melo", help="comma list of hook, melo, ft")
    parser.add_argument("--n", type=int, default=200, help="phases: timed edits per run")
    parser.add_argument("--warmup", type=int, default=10, help="phases: warm-up edits (>= batch)")
    parser.add_argument("--rounds", type=int, default=1, help="phases: runs of each, interleaved")
    parser.add_argument("--hook-batch-sizes", type=ints, default=[1, 10, 50])
    parser.add_argument("--melo-batch-sizes", type=ints, default=[10])
    parser.add_argument("--ft-batch-sizes", type=ints, default=[1])
    parser.add_argument("--budgets", type=ints, default=[20_000, 100_000, 400_000])
    parser.add_argument("--sizes", type=ints, default=[100, 1000], help="scale: edit counts")
    parser.add_argument("--batch-size", type=int, default=10, help="scale: edits per batch")
    parser.add_argument("--work", type=Path, default=Path("var/bench/cost"), help="scratch")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(args.backends) - set(PROBES))
    if unknown:
        parser.error(f"unknown back-ends {unknown} (known: {sorted(PROBES)})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    configure_logging("warning", "console")
    cfg = cost_config(args)
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    before = machine()  # the code as imported (other work may change the tree meanwhile)
    probes = [p.prompt for p in probes_from_world(str(args.model))]
    if args.stage == "phases":
        result = stage_phases(args, cfg, probes)
    elif args.stage == "covariance":
        result = stage_covariance(args, cfg)
    else:
        result = stage_scale(args, cfg, probes)
    tag = "" if args.stage == "covariance" else "-" + "+".join(args.backends)
    out = {
        "benchmark": f"cost-{args.stage}",
        "model": args.model.name,
        "edits_file": str(args.edits),
        "hook": {"layers": list(cfg.editors.hook.layers), "key_position": "prompt_last"},
        **result,
        "machine": {**before, "load_average_after": machine()["load_average"]},
        "command": " ".join([".venv/bin/python -m bench.cost", *argv]),
    }
    {"phases": print_phases, "covariance": print_covariance, "scale": print_scale}[args.stage](out)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cost-{args.stage}{tag}-{args.model.name}.json"
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
