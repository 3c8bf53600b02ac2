"""Inference overhead with N edits applied: the edited model against the base model.

Target: "Inference with 1,000 edits applied: at most 10% slower than the base model on
the same prompts, same run."

For each editor (``hook``, ``melo`` or both) the benchmark loads the model twice in one
process: a base copy that is never edited, and a copy the editor is built on exactly as
the daemon builds it (``daemon.editors.registry.make_editor`` with the loaded config;
MELO gets the world's drift probes as calibration prompts, as ``Daemon`` passes them).
It applies the first N edits of the JSONL in batches of ``--batch-size`` and then times,
on one fixed prompt set (the prompts of the first 100 edits, their locality prompts and
the world's drift probes):

- greedy generation, 32 prompts per call, each chunk inside ``editor.routing(chunk)`` as
  ``Engine.greedy`` does (the base copy runs without routing); base and edited passes are
  interleaved, alternating which goes first, ``--rounds`` times each after one warm-up;
- one forward pass (logits) of a batch of 32 prompts, interleaved the same way, with the
  routing cost (MELO's key look-up) timed on its own as well.

Overhead = median edited seconds / median base seconds - 1 (the median of the paired
per-round ratios is reported too). A sanity check reads the generations: edit prompts
should answer their new targets and locality/probe prompts should mostly answer as the
base model does, so the timed model really carries the edits.

Routing quality, measured without generation: the hook's scope gate (``last_route`` of
each ``HookedProjection`` after a forward pass, position ids as ``generate`` uses) at the
key site of each prompt (prompt-last keys: the last prompt token), per hook layer and in
any layer: how often edit prompts, training-template rephrases and held-out rephrases
open the gate (a miss is a false negative) and how often locality prompts and drift
probes do (a false positive), at the key site and at any of their tokens. For MELO the
same groups go through ``route_blocks``: routed to any block, and to the edit's own one.

The hook is configured as ``config.toml`` with ``[editors.hook] layers = [2, 3]`` and
``key_position = "prompt_last"`` (the layout BENCHMARKS.md evaluates). Its covariance
statistics are cached under ``<--stats-home>/stats/`` (the config's store folder); the
default ``var/evals/var`` is where ``var/evals/hook.toml`` keeps them. The cache key
holds the model path as given, so run from the repository root with the relative path.

    .venv/bin/python -m bench.inference --editor both --n 1000

Writes ``bench/results/inference-<editor>-<N>-<model>.json`` per editor and prints a table.
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

from bench.routing_quality import hook_gate_stats, melo_route_stats, position_ids, probe_groups
from daemon.config import Config, load_config
from daemon.drift.probes import left_padded, null_routing, probes_from_world
from daemon.editors.base import EditSpec
from daemon.editors.registry import make_editor
from daemon.eval.metrics import continuation_matches
from daemon.log import configure_logging
from daemon.model.generate import greedy_continuations
from daemon.model.loading import LoadedModel, load_model
from daemon.world.editsets import read_jsonl

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
GREEDY_BATCH = 32  # Engine.greedy's chunk size
FORWARD_BATCH = 32
EDIT_PROMPTS = 100
TARGET_OVERHEAD = 0.10
HOOK_LAYERS = (2, 3)

Routing = Callable[[Sequence[str]], AbstractContextManager[None]]


# --- setup ------------------------------------------------------------------------------


def editor_config(config_path: Path, stats_home: Path) -> Config:
    """``config_path`` with the hook at layers 2-3, prompt-last keys; store under ``stats_home``."""
    cfg = load_config(config_path)
    hook = dataclasses.replace(cfg.editors.hook, layers=HOOK_LAYERS, key_position="prompt_last")
    editors = dataclasses.replace(cfg.editors, hook=hook)
    store = dataclasses.replace(cfg.store, path=stats_home / "editd.sqlite3")
    return dataclasses.replace(cfg, editors=editors, store=store)


def load(cfg: Config, model: str) -> LoadedModel:
    return load_model(model, device=cfg.model.device, dtype=cfg.model.dtype)


def edit_specs(records: Sequence[dict[str, Any]]) -> list[EditSpec]:
    return [
        EditSpec(
            edit_id=str(r["id"]),
            prompt=r["prompt"],
            target=r["target"],
            subject=r.get("subject"),
            relation=r.get("relation"),
        )
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
    """Seconds of greedy generation of exactly ``steps`` tokens per prompt (eos ignored).

    Edited prompts give longer answers than the base model's, so plain greedy
    generation (stopping at eos) also runs more decode steps; this measures the
    per-step cost alone: base and edited run the same number of forwards.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    for start in range(0, len(prompts), GREEDY_BATCH):
        chunk = list(prompts[start : start + GREEDY_BATCH])
        ids, mask = left_padded(tokenizer, chunk)
        with routing(chunk):
            cast(Any, model).generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                num_beams=1,
                max_new_tokens=steps,
                min_new_tokens=steps,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
    return time.perf_counter() - t0


def time_fixed_steps(
    base: LoadedModel,
    edited: LoadedModel,
    routing: Routing,
    prompts: Sequence[str],
    rounds: int,
    steps: int,
) -> dict[str, Any]:
    """Interleaved fixed-step generation rounds (order alternates)."""
    runs = {
        "base": lambda: generate_fixed_steps(
            base.model, base.tokenizer, prompts, null_routing, steps
        ),
        "edited": lambda: generate_fixed_steps(
            edited.model, edited.tokenizer, prompts, routing, steps
        ),
    }
    runs["base"](), runs["edited"]()  # warm-up
    times: dict[str, list[float]] = {"base": [], "edited": []}
    for r in range(rounds):
        for name in ("base", "edited") if r % 2 == 0 else ("edited", "base"):
            times[name].append(runs[name]())
    return summarise(times["base"], times["edited"])


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


def summarise(base: Sequence[float], edited: Sequence[float]) -> dict[str, Any]:
    mb, me = statistics.median(base), statistics.median(edited)
    ratios = [e / b for b, e in zip(base, edited, strict=True)]
    return {
        "base_s": [round(x, 4) for x in base],
        "edited_s": [round(x, 4) for x in edited],
        "median_base_s": round(mb, 4),
        "median_edited_s": round(me, 4),
        "overhead": round(me / mb - 1.0, 4),
        "paired_overhead_median": round(statistics.median(ratios) - 1.0, 4),
        "paired_overhead_min": round(min(ratios) - 1.0, 4),
        "paired_overhead_max": round(max(ratios) - 1.0, 4),
    }


def time_generation(
    base: LoadedModel,
    edited: LoadedModel,
    routing: Routing,
    prompts: Sequence[str],
    rounds: int,
    max_new_tokens: int,
) -> tuple[dict[str, Any], list[str], list[str]]:
    """Interleaved generation rounds (order alternates); returns the summary and outputs."""
    runs = {
        "base": lambda: generate(base.model, base.tokenizer, prompts, null_routing, max_new_tokens),
        "edited": lambda: generate(
            edited.model, edited.tokenizer, prompts, routing, max_new_tokens
        ),
    }
    _, base_out = runs["base"]()  # warm-up, and the outputs compared below
    _, edited_out = runs["edited"]()
    times: dict[str, list[float]] = {"base": [], "edited": []}
    for r in range(rounds):
        for name in ("base", "edited") if r % 2 == 0 else ("edited", "base"):
            times[name].append(runs[name]()[0])
    return summarise(times["base"], times["edited"]), base_out, edited_out


def time_forward(
    base: LoadedModel, edited: LoadedModel, routing: Routing, prompts: Sequence[str], reps: int
) -> dict[str, Any]:
    """Interleaved single forward passes of one batch of ``FORWARD_BATCH`` prompts."""
    step = max(1, len(prompts) // FORWARD_BATCH)
    chosen = list(prompts[::step][:FORWARD_BATCH])
    ids, mask = left_padded(base.tokenizer, chosen)
    batch = (ids, mask, position_ids(mask))
    forward(base.model, batch, chosen, null_routing)
    forward(edited.model, batch, chosen, routing)
    times: dict[str, list[float]] = {"base": [], "edited": []}
    route_s: list[float] = []
    for r in range(reps):
        for name in ("base", "edited") if r % 2 == 0 else ("edited", "base"):
            if name == "base":
                times["base"].append(forward(base.model, batch, chosen, null_routing)[0])
            else:
                total, routed = forward(edited.model, batch, chosen, routing)
                times["edited"].append(total)
                route_s.append(routed)
    out = summarise(times["base"], times["edited"])
    out.pop("base_s")
    out.pop("edited_s")
    out.update(batch=len(chosen), tokens=int(mask.sum()), width=int(mask.shape[1]), reps=reps)
    out["median_routing_s"] = round(statistics.median(route_s), 5)
    return out


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


# --- routing quality ----------------------------------------------------------------------


def editor_facts(name: str, editor: Any) -> dict[str, Any]:
    if name == "hook":
        health = editor.health()
        return {
            "layers": list(editor.settings.layers),
            "key_position": editor.settings.key_position,
            "gate_cos_floor": editor.settings.gate_cos_floor,
            "shards": health["shards"],
            "gate_keys": health["gate_keys"],
        }
    index = editor.index
    return {
        "layers": list(editor.layers),
        "key_layer": editor.key_layer,
        "index_keys": 0 if index is None else index.key_count,
        "blocks_used": editor.table.used,
    }


def run_editor(
    name: str, args: argparse.Namespace, cfg: Config, base: LoadedModel
) -> dict[str, Any]:
    records = read_jsonl(args.edits)[: args.n]
    if len(records) < args.n:
        raise SystemExit(f"{args.edits} holds only {len(records)} edits")
    probes = [p.prompt for p in probes_from_world(str(args.model))]
    edited = load(cfg, str(args.model))
    print(f"[{name}] building the editor ...", flush=True)
    t0 = time.perf_counter()
    editor = make_editor(name, edited, cfg, calibration_prompts=probes)
    build_s = time.perf_counter() - t0
    print(f"[{name}] applying {args.n} edits, batches of {args.batch_size} ...", flush=True)
    applied = apply_edits(editor, edit_specs(records), args.batch_size)
    groups = prompt_set(records, probes, args.prompts)
    prompts = [p for g in groups.values() for p in g]
    print(f"[{name}] timing {len(prompts)} prompts, {args.rounds} rounds ...", flush=True)
    gen, base_out, edited_out = time_generation(
        base, edited, editor.routing, prompts, args.rounds, args.max_new_tokens
    )
    fixed = time_fixed_steps(
        base, edited, editor.routing, prompts, args.rounds, args.max_new_tokens
    )
    fwd = time_forward(base, edited, editor.routing, prompts, args.forward_reps)
    targets = {r["prompt"]: r["target"] for r in records}
    checks = sanity(groups, targets, base_out, edited_out)
    print(f"[{name}] routing quality ...", flush=True)
    quality = probe_groups(records[: args.gate_edits], probes)
    if name == "hook":
        routing_quality = hook_gate_stats(edited, editor, quality)
    else:
        routing_quality = melo_route_stats(editor, quality)
    return {
        "benchmark": "inference",
        "editor": name,
        "model": args.model.name,
        "n_edits": args.n,
        "batch_size": args.batch_size,
        "editor_build_s": round(build_s, 1),
        **applied,
        "editor_facts": editor_facts(name, editor),
        "prompts": {k: len(v) for k, v in groups.items()},
        "max_new_tokens": args.max_new_tokens,
        "generation": gen,
        "generation_fixed_steps": fixed,
        "forward": fwd,
        "target_overhead": TARGET_OVERHEAD,
        "meets_target": gen["overhead"] <= TARGET_OVERHEAD,
        "sanity": checks,
        "routing_quality": {"edits_checked": min(args.gate_edits, args.n), **routing_quality},
    }


# --- report -------------------------------------------------------------------------------


def print_table(results: Sequence[dict[str, Any]]) -> None:
    print(
        f"\n{'editor':<6} {'edits':>5} {'what':<24} {'base s':>8} {'edited s':>9} "
        f"{'overhead':>9} {'paired':>8} {'<=10%':>6}"
    )
    for r in results:
        accepted = r["accepted"]
        for what, s in (
            ("greedy generation", r["generation"]),
            ("generation, fixed steps", r["generation_fixed_steps"]),
            ("forward, batch 32", r["forward"]),
        ):
            ok = "yes" if s["overhead"] <= TARGET_OVERHEAD else "NO"
            print(
                f"{r['editor']:<6} {accepted:>5} {what:<24} {s['median_base_s']:>8.4f} "
                f"{s['median_edited_s']:>9.4f} {s['overhead']:>+9.1%} "
                f"{s['paired_overhead_median']:>+8.1%} {ok:>6}"
            )
    for r in results:
        c = r["sanity"]
        print(
            f"\n{r['editor']}: apply {r['apply_s']} s ({r['accepted']}/{r['n_edits']} accepted); "
            f"forward routing {r['forward']['median_routing_s'] * 1000:.1f} ms; "
            f"edit prompts answer target {c['edit']['answers_target']:.2f}, "
            f"locality unchanged {c['locality']['unchanged']:.2f}, "
            f"probes unchanged {c['probe']['unchanged']:.2f}"
        )
        q = r["routing_quality"]
        print(
            f"  routing ({q['edits_checked']} edits): "
            f"FN rephrase {q['false_negative_rephrase']:.3f}, "
            f"FN held-out {q['false_negative_heldout']:.3f}, "
            f"FP locality {q['false_positive_locality']:.3f}, "
            f"FP probes {q['false_positive_probe']:.3f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, default=Path("var/worlds/small-llama"))
    parser.add_argument("--edits", type=Path, default=Path("var/evals/world-cf-1000.jsonl"))
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--editor", choices=("hook", "melo", "both"), default="both")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=200, help="size of the timed prompt set")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per model")
    parser.add_argument("--forward-reps", type=int, default=41)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument(
        "--gate-edits", type=int, default=1000, help="edits whose prompts probe routing"
    )
    parser.add_argument("--config", type=Path, default=REPO / "config.toml")
    parser.add_argument(
        "--stats-home",
        type=Path,
        default=Path("var/evals/var"),
        help="the config's store folder: hook covariance statistics are cached in its stats/",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    configure_logging("warning", "console")
    cfg = editor_config(args.config, args.stats_home)
    torch.set_num_threads(cfg.model.threads or 1)
    base = load(cfg, str(args.model))
    names = ("hook", "melo") if args.editor == "both" else (args.editor,)
    results = []
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        result = run_editor(name, args, cfg, base)
        result["machine"] = {
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        result["command"] = " ".join([".venv/bin/python -m bench.inference", *argv])
        path = args.out / f"inference-{name}-{args.n}-{args.model.name}.json"
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}", flush=True)
        results.append(result)
        gc.collect()
    print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
