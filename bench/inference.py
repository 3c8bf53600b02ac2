"""Inference overhead with 0, 100, 1,000, ... edits applied: the edited model against the base.

Target: inference with 1,000 edits applied at most 10% slower than the base model on the
same prompts, same run. Per editor (``hook``, ``melo`` or both) the model is loaded twice:
a base copy never edited, and a copy the editor is built on as the daemon builds it (MELO
calibrated on the world's drift probes). One stream of edits (the JSONL's, batches of
``--batch-size``) grows through ``--sizes`` (0: the editor installed, no edits); at each
size, on one prompt set (the first 100 edit prompts, locality prompts, drift probes), base
and edited passes are interleaved ``--rounds`` times after a warm-up (medians, ratios):
greedy generation in chunks of 32 inside ``editor.routing`` as ``Engine.greedy`` runs it
(completion latency); exactly ``--max-new-tokens`` per prompt, eos ignored (per-step cost,
tokens/s); one forward of 32 prompts. Routing alone: MELO's index search per query (the
live index, and synthetic indexes of N random keys for every size, also past the edit
file) and the hook gate's ``route`` per token position. A sanity check reads the outputs;
at the largest size, routing quality (``bench/routing_quality.py``). The hook runs at
layers 2-3 with prompt-last keys on a fact world, statistics cached under
``<--stats-home>/stats/``.

On a real model (a folder without ``world.json``) the edits come from a benchmark file
(CounterFact, zsRE, ..., converted as ``editd eval`` converts it), the probes are the
shipped common-facts prompts, and both editors keep the configuration's own settings
(the hook's layers from its locate cache, MELO's key position):

    .venv/bin/python -m bench.inference --editor both --sizes 0,100,1000,10000
    .venv/bin/python -m bench.inference --editor melo --sizes 0,1000 \
        --model var/models/smollm2-135m-instruct --config var/smol.toml \
        --edits ../shared/data/counterfact/counterfact-edit.json

Writes ``bench/results/inference-<editor>-<sizes joined by _>-<model>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, cast

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bench import plots
from bench import routing_quality as rq
from daemon.config import Config, load_config
from daemon.drift.commonfacts import probe_prompts as common_probe_prompts
from daemon.drift.probes import left_padded, null_routing
from daemon.editors.base import EditSpec
from daemon.engine.engine import build_editor
from daemon.eval.loaders import convert
from daemon.log import configure_logging
from daemon.model.answers import continuation_matches
from daemon.model.batches import left_padded_position_ids
from daemon.model.generate import greedy_continuations
from daemon.model.loading import LoadedModel, load_model
from daemon.world.editsets import probes_from_world, read_jsonl

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
GREEDY_BATCH = 32  # Engine.greedy's chunk size
FORWARD_BATCH = 32
EDIT_PROMPTS = 100
TARGET_OVERHEAD = 0.10
HOOK_LAYERS = (2, 3)

Routing = Callable[[Sequence[str]], AbstractContextManager[None]]


# --- setup ------------------------------------------------------------------------------


def is_world(model: Path) -> bool:
    """A fact world (its facts known exactly) rather than a real model's folder."""
    return (model / "world.json").is_file()


def editor_config(config_path: Path, stats_home: Path, world: bool) -> Config:
    """``config_path`` with its store under ``stats_home``; on a fact world, the hook at
    layers 2-3 with prompt-last keys."""
    cfg = load_config(config_path)
    if world:
        hook = dataclasses.replace(cfg.editors.hook, layers=HOOK_LAYERS, key_position="prompt_last")
        cfg = dataclasses.replace(cfg, editors=cfg.editors.with_sections(hook=hook))
    store = dataclasses.replace(cfg.store, path=stats_home / "editd.sqlite3")
    return dataclasses.replace(cfg, store=store)


def edit_records(path: Path, fmt: str, limit: int) -> list[dict[str, Any]]:
    """The edit stream: a world's JSONL as is, or a benchmark file converted to requests."""
    if fmt == "jsonl" or (fmt == "auto" and path.suffix == ".jsonl"):
        return read_jsonl(path)
    conversion = convert(path, fmt, limit=limit)
    return list(conversion.requests)


def probe_prompts_for(model: Path) -> list[str]:
    """A world's drift probes, or the shipped common-facts prompts for a real model."""
    if is_world(model):
        return [p.prompt for p in probes_from_world(str(model))]
    return list(dict.fromkeys(common_probe_prompts()))


def load(cfg: Config, model: str) -> LoadedModel:
    return load_model(model, device=cfg.model.device, dtype=cfg.model.dtype)


def edit_specs(records: Sequence[dict[str, Any]]) -> list[EditSpec]:
    return [
        EditSpec(str(r["id"]), r["prompt"], r["target"], r.get("subject"), r.get("relation"))
        for r in records
    ]


def apply_edits(editor: Any, specs: Sequence[EditSpec], batch_size: int) -> dict[str, Any]:
    """Apply ``specs`` in batches; accepted count, refusal reasons and seconds."""
    t0 = time.perf_counter()
    accepted = 0
    reasons: dict[str, int] = {}
    for start in range(0, len(specs), batch_size):
        for outcome in editor.apply(specs[start : start + batch_size]):
            if outcome.accepted:
                accepted += 1
            else:
                reason = str(outcome.reason)[:80]
                reasons[reason] = reasons.get(reason, 0) + 1
        done = min(start + batch_size, len(specs))
        if done % 100 == 0 or done == len(specs):
            print(f"  {time.perf_counter() - t0:7.1f} s  {done}/{len(specs)} applied", flush=True)
    seconds = time.perf_counter() - t0
    return {"accepted": accepted, "refused": reasons, "apply_s": round(seconds, 1)}


def prompt_set(
    records: Sequence[dict[str, Any]], probes: Sequence[str], total: int
) -> dict[str, list[str]]:
    """The timed prompts by group: edit prompts, locality prompts, drift probes."""
    n_edit = min(EDIT_PROMPTS, total // 2, len(records))
    edit = [r["prompt"] for r in records[:n_edit]]
    seen = set(edit)
    locality: list[str] = []
    want_locality = (total - n_edit) // 2
    for r in records:
        for item in r.get("locality", []):
            if len(locality) < want_locality and item["prompt"] not in seen:
                seen.add(item["prompt"])
                locality.append(item["prompt"])
    probe = [p for p in probes if p not in seen][: total - n_edit - len(locality)]
    return {"edit": edit, "locality": locality, "probe": probe}


# --- timing -----------------------------------------------------------------------------


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    routing: Routing,
    max_new_tokens: int,
) -> tuple[float, list[str]]:
    """Seconds and outputs of greedy generation over ``prompts``, as ``Engine.greedy`` runs it."""
    out: list[str] = []
    t0 = time.perf_counter()
    for start in range(0, len(prompts), GREEDY_BATCH):
        chunk = list(prompts[start : start + GREEDY_BATCH])
        with routing(chunk):
            out.extend(
                greedy_continuations(
                    model, tokenizer, chunk, max_new_tokens=max_new_tokens, batch_size=GREEDY_BATCH
                )
            )
    return time.perf_counter() - t0, out


@torch.no_grad()
def generate_fixed_steps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    routing: Routing,
    steps: int,
) -> float:
    """Seconds of greedy generation of exactly ``steps`` tokens per prompt (eos ignored)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    for start in range(0, len(prompts), GREEDY_BATCH):
        chunk = list(prompts[start : start + GREEDY_BATCH])
        ids, mask = left_padded(tokenizer, chunk)
        with routing(chunk):
            kwargs = {"max_new_tokens": steps, "min_new_tokens": steps, "num_beams": 1}
            cast(Any, model).generate(
                input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=pad, **kwargs
            )
    return time.perf_counter() - t0


@torch.no_grad()
def forward(
    model: PreTrainedModel,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    prompts: Sequence[str],
    routing: Routing,
) -> tuple[float, float]:
    """Seconds of one forward (logits) inside routing, and of entering the routing alone."""
    ids, mask, positions = batch
    t0 = time.perf_counter()
    with routing(prompts):
        t1 = time.perf_counter()
        cast(Any, model)(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
        )
    return time.perf_counter() - t0, t1 - t0


def interleaved(
    base: Callable[[], float], edited: Callable[[], float], rounds: int
) -> dict[str, Any]:
    """``rounds`` timings of each after one warm-up, alternating which runs first."""
    runs = {"base": base, "edited": edited}
    base(), edited()
    times: dict[str, list[float]] = {"base": [], "edited": []}
    for r in range(rounds):
        for name in ("base", "edited") if r % 2 == 0 else ("edited", "base"):
            times[name].append(runs[name]())
    return summarise(times["base"], times["edited"])


def summarise(base: Sequence[float], edited: Sequence[float]) -> dict[str, Any]:
    mb, me = statistics.median(base), statistics.median(edited)
    ratios = [e / b for b, e in zip(base, edited, strict=True)]
    return {
        "base_s": [round(x, 4) for x in base],
        "edited_s": [round(x, 4) for x in edited],
        "median_base_s": round(mb, 4),
        "median_edited_s": round(me, 4),
        "ratio": round(me / mb, 4),
        "overhead": round(me / mb - 1.0, 4),
        "paired_overhead_median": round(statistics.median(ratios) - 1.0, 4),
        "paired_overhead_min": round(min(ratios) - 1.0, 4),
        "paired_overhead_max": round(max(ratios) - 1.0, 4),
    }


def time_size(
    base: LoadedModel, edited: LoadedModel, routing: Routing, prompts: list[str], args: Any
) -> tuple[dict[str, Any], list[str], list[str]]:
    """Greedy generation, fixed-step generation and one forward: edited against base."""
    steps = args.max_new_tokens
    _, base_out = generate(base.model, base.tokenizer, prompts, null_routing, steps)
    _, edited_out = generate(edited.model, edited.tokenizer, prompts, routing, steps)
    gen = interleaved(
        lambda: generate(base.model, base.tokenizer, prompts, null_routing, steps)[0],
        lambda: generate(edited.model, edited.tokenizer, prompts, routing, steps)[0],
        args.rounds,
    )
    gen["ms_per_prompt_base"] = round(gen["median_base_s"] / len(prompts) * 1000, 3)
    gen["ms_per_prompt_edited"] = round(gen["median_edited_s"] / len(prompts) * 1000, 3)
    fixed = interleaved(
        lambda: generate_fixed_steps(base.model, base.tokenizer, prompts, null_routing, steps),
        lambda: generate_fixed_steps(edited.model, edited.tokenizer, prompts, routing, steps),
        args.rounds,
    )
    tokens = len(prompts) * steps
    fixed["tokens_per_s_base"] = round(tokens / fixed["median_base_s"], 1)
    fixed["tokens_per_s_edited"] = round(tokens / fixed["median_edited_s"], 1)
    chosen = prompts[:: max(1, len(prompts) // FORWARD_BATCH)][:FORWARD_BATCH]
    ids, mask = left_padded(base.tokenizer, chosen)
    batch = (ids, mask, left_padded_position_ids(mask))
    route_s: list[float] = []

    def edited_forward() -> float:
        total, routed = forward(edited.model, batch, chosen, routing)
        route_s.append(routed)
        return total

    fwd = interleaved(
        lambda: forward(base.model, batch, chosen, null_routing)[0], edited_forward, args.reps
    )
    for key in ("base_s", "edited_s"):
        fwd.pop(key)
    fwd.update(batch=len(chosen), tokens=int(mask.sum()), width=int(mask.shape[1]))
    fwd["median_routing_s"] = round(statistics.median(route_s), 5)
    timed = {"generation": gen, "generation_fixed_steps": fixed, "forward": fwd}
    return timed, base_out, edited_out


def sanity(
    groups: dict[str, list[str]],
    targets: dict[str, str],
    base_out: Sequence[str],
    edited_out: Sequence[str],
) -> dict[str, Any]:
    """Do edit prompts answer their targets, and other prompts as the base model does?"""
    out: dict[str, Any] = {}
    i = 0
    for name, prompts in groups.items():
        b, e = base_out[i : i + len(prompts)], edited_out[i : i + len(prompts)]
        i += len(prompts)
        same = sum(x == y for x, y in zip(b, e, strict=True)) / max(1, len(prompts))
        out[name] = {"n": len(prompts), "unchanged": round(same, 3)}
        if name == "edit":
            hits = sum(continuation_matches(o, targets[p]) for p, o in zip(prompts, e, strict=True))
            out[name]["answers_target"] = round(hits / max(1, len(prompts)), 3)
    return out


# --- one editor ---------------------------------------------------------------------------


def run_editor(
    name: str, args: argparse.Namespace, cfg: Config, base: LoadedModel
) -> dict[str, Any]:
    records = edit_records(args.edits, args.format, max(args.sizes))
    probes = probe_prompts_for(args.model)
    edited = load(cfg, str(args.model))
    print(f"[{name}] building the editor ...", flush=True)
    t0 = time.perf_counter()
    editor: Any = build_editor(name, edited, cfg, calibration_prompts=probes)
    build_s = time.perf_counter() - t0
    specs = edit_specs(records)
    groups = prompt_set(records, probes, args.prompts)
    prompts = [p for g in groups.values() for p in g]
    targets = {r["prompt"]: r["target"] for r in records}
    sizes: list[dict[str, Any]] = []
    for size in args.sizes:
        if size > len(specs):
            print(f"[{name}] {size} edits: the file holds {len(specs)}; skipped", flush=True)
            sizes.append({"edits": size, "skipped": f"{args.edits} holds {len(specs)} edits"})
            continue
        done = sizes[-1]["edits"] if sizes and "skipped" not in sizes[-1] else 0
        if size > done:
            print(f"[{name}] applying edits {done + 1}..{size}", flush=True)
        applied = apply_edits(editor, specs[done:size], args.batch_size)
        print(f"[{name}] {size} edits: timing {len(prompts)} prompts ...", flush=True)
        timed, base_out, edited_out = time_size(base, edited, editor.routing, prompts, args)
        sizes.append(
            {
                "edits": size,
                **applied,
                "editor_facts": rq.editor_facts(name, editor),
                **timed,
                "routing_cost": rq.routing_cost(name, editor, edited, prompts, args.reps),
                "sanity": sanity(groups, targets, base_out, edited_out),
            }
        )
        gc.collect()
    result: dict[str, Any] = {
        "benchmark": "inference",
        "editor": name,
        "model": args.model.name,
        "sizes": args.sizes,
        "batch_size": args.batch_size,
        "editor_build_s": round(build_s, 1),
        "prompts": {k: len(v) for k, v in groups.items()},
        "max_new_tokens": args.max_new_tokens,
        "target_overhead": TARGET_OVERHEAD,
        "by_size": sizes,
    }
    if name == "melo":
        result["index_search_synthetic"] = rq.melo_synthetic_costs(
            editor, cfg.editors.melo.exact_index_max, args.sizes, prompts, args.reps
        )
    applied_n = max((s["edits"] for s in sizes if "skipped" not in s), default=0)
    if applied_n:
        print(f"[{name}] routing quality at {applied_n} edits ...", flush=True)
        quality = rq.probe_groups(records[: min(args.gate_edits, applied_n)], probes)
        if name == "hook":
            stats = rq.hook_gate_stats(edited, editor, quality)
        else:
            stats = rq.melo_route_stats(editor, quality)
        result["routing_quality"] = {"edits_checked": min(args.gate_edits, applied_n), **stats}
    return result


# --- report -------------------------------------------------------------------------------


def _sizes(value: str) -> list[int]:
    sizes = sorted({int(v) for v in value.split(",") if v.strip()})
    if not sizes or sizes[0] < 0:
        raise argparse.ArgumentTypeError("expected comma-separated edit counts >= 0")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, default=Path("var/worlds/small-llama"))
    parser.add_argument("--edits", type=Path, default=Path("var/evals/world-cf-1000.jsonl"))
    parser.add_argument("--format", default="auto", help="jsonl, or a benchmark format")
    parser.add_argument("--sizes", type=_sizes, default=[0, 100, 1000])
    parser.add_argument("--n", type=int, help="one size (as --sizes N)")
    parser.add_argument("--editor", choices=("hook", "melo", "both"), default="both")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=200, help="size of the timed prompt set")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per model")
    parser.add_argument("--reps", "--forward-reps", type=int, default=41, help="forward reps")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--gate-edits", type=int, default=1000, help="edits probing routing")
    parser.add_argument("--config", type=Path, default=REPO / "config.toml")
    parser.add_argument("--stats-home", type=Path, default=Path("var/evals/var"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.n is not None:
        args.sizes = [args.n]
    configure_logging("warning", "console")
    cfg = editor_config(args.config, args.stats_home, is_world(args.model))
    torch.set_num_threads(cfg.model.threads or 1)
    base = load(cfg, str(args.model))
    results = []
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("hook", "melo") if args.editor == "both" else (args.editor,):
        result = run_editor(name, args, cfg, base)
        result["machine"] = {
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        result["command"] = " ".join([".venv/bin/python -m bench.inference", *argv])
        tag = "_".join(str(s) for s in args.sizes)
        path = args.out / f"inference-{name}-{tag}-{args.model.name}.json"
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}", flush=True)
        results.append(result)
        gc.collect()
    print(plots.inference_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
