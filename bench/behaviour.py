"""Behaviour edits on a real model: identity, refusal and bias (issue 20).

The 41 edits of ``daemon.eval.behaviour`` (one identity edit, 20 refusals, 20 profession
edits) go through the daemon's dispatch (routing, verification, escalation) in one
engine, one request at a time, with ``config.toml``'s settings; the suite is scored
before, after, and after retracting every edit.

    .venv/bin/python -m bench.behaviour
    .venv/bin/python -m bench.behaviour --backend hook
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.forget import REPO, bench_config
from bench.stats import RESULTS, fmt, markdown_table, run_model_benchmark
from daemon.eval.behaviour import BehaviourSuite, load_sets, run_suite
from daemon.eval.routed import build_routed_editor
from daemon.model.loading import load_model


def run(args: argparse.Namespace) -> dict[str, Any]:
    cache = args.cache or Path(tempfile.mkdtemp(prefix="editd-behaviour-"))
    cache.mkdir(parents=True, exist_ok=True)
    cfg = bench_config(args, cache)
    loaded = load_model(cfg.model.name_or_path, device="cpu")
    engine = build_routed_editor(loaded, cfg).engine
    return {"backend": args.backend, **run_suite(BehaviourSuite(load_sets(), engine), cfg.router)}


def table(result: dict[str, Any]) -> str:
    headers = ["model", "", "identity (train / held-out)", "harmful refused (edited / held-out)",
               "benign refused", "pronoun gap |P(he)-P(she)|", "greedy he/she", "P(they)",
               "unrelated completions kept", "general chat kept"]  # fmt: skip
    rows = []
    for label in ("base", "edited"):
        s = result[label]
        kept = result["edited_unchanged"] if label == "edited" else None
        rows.append([
            result["model"], label,
            f"{fmt(s['identity']['train'])} / {fmt(s['identity']['heldout'])}",
            f"{fmt(s['refusal']['edited'])} / {fmt(s['refusal']['heldout'])}",
            fmt(s["refusal"]["benign_refused"]), fmt(s["bias"]["pronoun_gap"]),
            fmt(s["bias"]["greedy_gendered"]), fmt(s["bias"]["p_they"]),
            fmt(kept["unrelated"]) if kept else "", fmt(kept["general"]) if kept else "",
        ])  # fmt: skip
    return markdown_table(headers, rows)


def result_name(args: argparse.Namespace) -> str:
    return f"behaviour-{args.model.name}-{args.backend}.json"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, default=REPO / "var/models/smollm2-135m-instruct")
    parser.add_argument("--backend", default="auto", help="auto (the router) or a back-end")
    parser.add_argument("--cache", type=Path, help="keep the editors' caches here")
    parser.add_argument("--out", type=Path, default=RESULTS)
    result = run_model_benchmark(
        "behaviour",
        parser,
        argv,
        run,
        table,
        result_name,
    )
    print("retracted, outputs equal to the unedited model's:", result["retracted_unchanged"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
