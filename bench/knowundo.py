"""KnowUnDo (privacy split) through editd: fine-tune, then forget the unlearn split.

Step 1 (cached): a copy of the model is fine-tuned on ``full.json`` (every fictitious
person's questions and answers) and saved to ``--finetuned`` (default
``var/models/<model>-knowundo``), a benchmark artefact reused by later runs. Steps 2-3
(``daemon.eval.knowundo``): the first ``--n`` unlearn questions are forgotten one
request at a time through the daemon's dispatch with ``config.toml``'s settings; forget
efficacy on them and retention on the retention questions of the same people are
reported next to the fine-tuned model's own scores.

    .venv/bin/python -m bench.knowundo --n 100
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from bench.forget import REPO, bench_config
from bench.stats import RESULTS, fmt, markdown_table, run_model_benchmark
from daemon.engine.engine import Engine
from daemon.eval.knowundo import (
    QA,
    finetune,
    load_split,
    person_of,
    recall_scores,
    run_knowundo,
)
from daemon.eval.routed import build_routed_editor
from daemon.model.loading import load_model

DATA = REPO.parent / "shared" / "data" / "knowundo"
log = structlog.get_logger()


def ensure_finetuned(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The fine-tuned copy's folder, fine-tuning it first when absent; and its record."""
    scale = f"-{args.people}people" if args.people else ""
    out: Path = args.finetuned or REPO / "var" / "models" / f"{args.model.name}-knowundo{scale}"
    record = out / "knowundo-finetune.json"
    if record.is_file():
        return out, json.loads(record.read_text())
    loaded = load_model(str(args.model), device="cpu", dtype="float32")
    loaded.model.requires_grad_(True)
    pairs = of_people(load_split(DATA / "full.json"), chosen_people(args))
    t0 = time.perf_counter()

    def progress(step: int, loss: float) -> None:
        if step % 20 == 0:
            log.warning("knowundo_finetune", step=step, loss=round(loss, 4))

    losses = finetune(
        loaded.model,
        loaded.tokenizer,
        pairs,
        epochs=args.epochs,
        learning_rate=args.lr,
        on_step=progress,
    )
    out.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    facts = {
        "from": str(args.model),
        "records": len(pairs),
        "people": args.people or "all",
        "epochs": args.epochs,
        "learning_rate": args.lr,
        "epoch_losses": [round(x, 4) for x in losses],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    record.write_text(json.dumps(facts, indent=2) + "\n")
    return out, facts


def chosen_people(args: argparse.Namespace) -> set[str | None] | None:
    """The first ``--people`` people named by the unlearn questions (None: everyone)."""
    if not args.people:
        return None
    named: list[str] = []
    for qa in load_split(DATA / "unlearn_train.json"):
        person = person_of(qa.question)
        if person and person not in named:
            named.append(person)
    return set(named[: args.people])


def of_people(qas: list[QA], people: set[str | None] | None) -> list[QA]:
    """The records about ``people`` (all records when None)."""
    return qas if people is None else [q for q in qas if person_of(q.question) in people]


def run(args: argparse.Namespace) -> dict[str, Any]:
    folder, trained = ensure_finetuned(args)
    cache = args.cache or Path(tempfile.mkdtemp(prefix="editd-knowundo-"))
    cache.mkdir(parents=True, exist_ok=True)
    cfg = bench_config(argparse.Namespace(model=folder, backend=args.backend), cache)
    loaded = load_model(str(folder), device="cpu")
    engine = build_routed_editor(loaded, cfg).engine
    people = chosen_people(args)
    unlearn = of_people(load_split(DATA / "unlearn_train.json"), people)[: args.n]
    people = {person_of(q.question) for q in unlearn} - {None}
    retention = [
        q for q in load_split(DATA / "retention_train.json") if person_of(q.question) in people
    ]
    base_model = load_model(str(args.model), device="cpu")
    base_engine = Engine(base_model, {})  # no edits: no editors to build
    before_finetune = {
        "unlearn": _mean(recall_scores(base_engine, unlearn)),
        "retention": _mean(recall_scores(base_engine, retention)),
    }
    del base_engine, base_model
    report = run_knowundo(engine, unlearn, retention, cfg.router)
    return {
        "finetune": trained,
        "people": len(people),
        "base_model_rouge_l": before_finetune,
        **report,
    }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def table(result: dict[str, Any]) -> str:
    headers = [
        "model", "unlearn questions", "retention questions",
        "ROUGE-L unlearn (base / fine-tuned / edited)",
        "ROUGE-L retention (base / fine-tuned / edited)",
        "forget efficacy", "retention", "applied / failed", "s/forget",
    ]  # fmt: skip
    ft, ed, base = (
        result["finetuned_rouge_l"],
        result["edited_rouge_l"],
        result["base_model_rouge_l"],
    )
    row = [
        result["model"], result["unlearn_questions"], result["retention_questions"],
        f"{fmt(base['unlearn'])} / {fmt(ft['unlearn'])} / {fmt(ed['unlearn'])}",
        f"{fmt(base['retention'])} / {fmt(ft['retention'])} / {fmt(ed['retention'])}",
        fmt(result["forget_efficacy"]), fmt(result["retention"]),
        f"{result['applied']} / {result['failed']}", result["s_per_forget"],
    ]  # fmt: skip
    return markdown_table(headers, [row])


def result_name(args: argparse.Namespace) -> str:
    scale = f"-{args.people}people" if args.people else ""
    return f"knowundo-{args.model.name}-{args.backend}-{args.n}{scale}.json"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, default=REPO / "var/models/smollm2-135m-instruct")
    parser.add_argument("--finetuned", type=Path, help="the fine-tuned copy (made if absent)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--n", type=int, default=100, help="unlearn questions to forget")
    parser.add_argument(
        "--people",
        type=int,
        default=0,
        help="run the whole protocol (fine-tuning included) on the first N people only",
    )
    parser.add_argument("--backend", default="auto", help="auto (the router) or a back-end")
    parser.add_argument("--cache", type=Path, help="keep the editors' caches here")
    parser.add_argument("--out", type=Path, default=RESULTS)
    run_model_benchmark(
        "knowundo",
        parser,
        argv,
        run,
        table,
        result_name,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
