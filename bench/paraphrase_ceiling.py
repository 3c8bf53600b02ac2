"""How far a model carries its *own* knowledge to a paraphrase: a ceiling for editing.

An edited fact cannot be expected to hold under paraphrase more often than the model's
own facts do. For each model this measures, by greedy generation and before any edit:

- common facts: of the shipped general-knowledge facts (``daemon/data/common-facts.json``,
  three templates per relation) that the model states under the first template, the
  share it also states under the other two;
- CounterFact: of records 0..N-1 whose true object the model states on the record's
  prompt, the share of their rephrase prompts (an unrelated sentence, then the fact
  in other words) it answers with that object first, and within 8 tokens.

Prints a table and writes ``<results>/paraphrase-ceiling.json``.

    .venv/bin/python -m bench.paraphrase_ceiling \
        --models var/models/smollm2-135m-instruct,var/models/gemma-3-270m --n 1000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from daemon.drift.commonfacts import known_facts
from daemon.editors.noop import NoopEditor
from daemon.eval.loaders import convert
from daemon.eval.metrics import fraction_or_none
from daemon.eval.scoring import generate, generation_hits
from daemon.model.answers import continuation_matches, reply_mentions
from daemon.model.loading import LoadedModel, load_model

REPO = Path(__file__).resolve().parent.parent
COUNTERFACT = REPO.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json"
WITHIN_TOKENS = 8


def common_facts_ceiling(loaded: LoadedModel) -> dict[str, Any]:
    """Known under template 1 -> stated under templates 2 and 3."""
    bank = known_facts(loaded.model, loaded.tokenizer)
    pairs = [(p, " " + f.object) for f in bank.facts for p in bank.prompts(f)[1:]]
    out = generate(
        NoopEditor(), loaded.model, loaded.tokenizer, [p for p, _ in pairs], max_new_tokens=6
    )
    hits = [continuation_matches(o, t) for o, (_, t) in zip(out, pairs, strict=True)]
    return {"known": len(bank.facts), "prompts": len(pairs), "paraphrase": fraction_or_none(hits)}


def counterfact_ceiling(loaded: LoadedModel, path: Path, n: int) -> dict[str, Any]:
    """Records whose true object the model states -> their rephrases."""
    rows = [r for r in convert(path, "counterfact", limit=n).requests if r.get("target_true")]
    editor, model, tok = NoopEditor(), loaded.model, loaded.tokenizer
    prompts, answers = [r["prompt"] for r in rows], [r["target_true"] for r in rows]
    own = generation_hits(editor, model, tok, prompts, answers)
    known = [r for r, hit in zip(rows, own, strict=True) if hit]
    pairs = [(p, r["target_true"]) for r in known for p in r.get("rephrases", [])]
    first = generation_hits(editor, model, tok, [p for p, _ in pairs], [t for _, t in pairs])
    replies = generate(editor, model, tok, [p for p, _ in pairs], max_new_tokens=WITHIN_TOKENS)
    within = [reply_mentions(r, t) for r, (_, t) in zip(replies, pairs, strict=True)]
    return {
        "records": len(rows),
        "known": len(known),
        "prompts": len(pairs),
        "paraphrase": fraction_or_none(first),
        f"paraphrase_within_{WITHIN_TOKENS}": fraction_or_none(within),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", required=True, help="model folders, comma-separated")
    p.add_argument("--n", type=int, default=1000, help="CounterFact records 0..N-1")
    p.add_argument("--counterfact", type=Path, default=COUNTERFACT)
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    for spec in args.models.split(","):
        loaded = load_model(spec, device="cpu", dtype="float32")
        rows.append(
            {
                "model": Path(spec).name,
                "common_facts": common_facts_ceiling(loaded),
                "counterfact": counterfact_ceiling(loaded, args.counterfact, args.n),
            }
        )
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / "paraphrase-ceiling.json"
    out.write_text(json.dumps({"n": args.n, "models": rows}, indent=2) + "\n")
    w = f"paraphrase_within_{WITHIN_TOKENS}"
    lines = [
        "| model | common facts known | their paraphrases | CounterFact known | "
        f"their rephrases (first) | (within {WITHIN_TOKENS} tokens) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cf, cx = r["common_facts"], r["counterfact"]
        lines.append(
            f"| {r['model']} | {cf['known']} | {cf['paraphrase']:.3f} | "
            f"{cx['known']} of {cx['records']} | {cx['paraphrase'] or 0:.3f} | {cx[w] or 0:.3f} |"
        )
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
