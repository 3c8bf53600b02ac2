"""Forgetting what a real model knows: 100 sequential ``forget`` requests (issue 20).

Facts the model answers correctly by greedy generation are taken from CounterFact (or
zsRE), forgotten one request at a time through the daemon's dispatch (routing,
verification, escalation: ``daemon.engine.dispatch``) with ``config.toml``'s settings,
and scored by ``daemon.eval.forgetting``: leak rates on the prompt, on held-out
rephrases and on adversarial rephrasings, the probability view, locality on the
neighbourhood prompts, perplexity; then every forget is retracted and the outputs are
compared with the unedited model's.

    .venv/bin/python -m bench.forget                                # SmolLM2, 100, scope prompt
    .venv/bin/python -m bench.forget --scope subject --n 100
    .venv/bin/python -m bench.forget --backend hook --n 20
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.stats import RESULTS, fmt, markdown_table, run_model_benchmark
from daemon.config import Config, load_config
from daemon.eval.forgetting import forget_known
from daemon.eval.loaders import convert
from daemon.eval.routed import build_routed_editor
from daemon.model.loading import load_model
from store.records import parse_edit_request
from store.schema import Scope

REPO = Path(__file__).resolve().parent.parent
DATA = {
    "counterfact": REPO.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json",
    "zsre": REPO.parent / "shared" / "data" / "zsre" / "zsre_mend_edit.json",
}


def bench_config(args: argparse.Namespace, store_dir: Path) -> Config:
    """``config.toml`` with this run's model, back-end choice and a scratch store folder
    (the editors' caches live beside the store; ``--cache`` keeps them between runs)."""
    cfg = load_config(REPO / "config.toml")
    model = dataclasses.replace(cfg.model, name_or_path=str(args.model), device="cpu")
    store = dataclasses.replace(cfg.store, path=store_dir / "editd.sqlite3")
    router = cfg.router
    if args.backend != "auto":
        router = dataclasses.replace(router, default_backend=args.backend)
    return dataclasses.replace(cfg, model=model, store=store, router=router)


def run(args: argparse.Namespace) -> dict[str, Any]:
    cache = args.cache or Path(tempfile.mkdtemp(prefix="editd-forget-"))
    cache.mkdir(parents=True, exist_ok=True)
    cfg = bench_config(args, cache)
    loaded = load_model(cfg.model.name_or_path, device="cpu")
    engine = build_routed_editor(loaded, cfg).engine
    converted = convert(DATA[args.data], limit=args.pool)
    facts = [parse_edit_request(r) for r in converted.requests]
    report = forget_known(
        engine,
        facts,
        args.n,
        cfg.router,
        scope=Scope(args.scope),
        batch_size=args.batch_size,
    )
    return {"data": args.data, "pool": converted.records, "backend": args.backend, **report}


def table(result: dict[str, Any]) -> str:
    headers = ["model", "scope", "forgets", "applied / failed", "leak prompt",
               "leak rephrase", "leak adversarial", "P(answer) prompt", "locality",
               "perplexity", "restored after retract", "s/forget"]  # fmt: skip
    rows = []
    for label in ("base", "edited", "retracted"):
        s = result[label]
        rows.append([
            f"{result['model']} ({label})", result["scope"], result["known"],
            f"{sum(result['applied_by'].values())} / {len(result['failed'])}"
            if label == "edited" else "",
            fmt(s["leak"]["prompt"]), fmt(s["leak"]["rephrase"]), fmt(s["leak"]["adversarial"]),
            fmt(s["probability"].get("prompt")), fmt(s["locality"]) if label == "edited" else "",
            fmt(s["perplexity"]),
            fmt(result["restored_exactly"]) if label == "retracted" else "",
            result["s_per_forget"] if label == "edited" else "",
        ])  # fmt: skip
    return markdown_table(headers, rows)


def result_name(args: argparse.Namespace) -> str:
    return f"forget-{args.model.name}-{args.data}-{args.scope}-{args.backend}-{args.n}.json"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, default=REPO / "var/models/smollm2-135m-instruct")
    parser.add_argument("--data", choices=sorted(DATA), default="counterfact")
    parser.add_argument("--n", type=int, default=100, help="facts to forget")
    parser.add_argument("--pool", type=int, default=2000, help="records screened for known facts")
    parser.add_argument("--scope", choices=[s.value for s in Scope], default="prompt")
    parser.add_argument("--backend", default="auto", help="auto (the router) or a back-end")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--cache", type=Path, help="keep the editors' caches here")
    parser.add_argument("--out", type=Path, default=RESULTS)
    run_model_benchmark("forget", parser, argv, run, table, result_name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
