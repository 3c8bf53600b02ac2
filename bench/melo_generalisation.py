"""Where MELO's CounterFact paraphrase misses come from, and what an edit does to its subject.

MELO (subject keys, the default) applies CounterFact records 0..N-1 in batches of 10 on a
real model; the editor sees prompt, target and subject only. Then, by greedy generation:

- efficacy on the edit prompts; paraphrase on the records' rephrase prompts, split into
  ROME's paraphrase prompts (an unrelated sentence, then the fact: "... results. Edwin of
  Northumbria is affiliated with the religion") and the rest, which are ROME's generation
  prompts ("Where Danielle Darrieux is from, people speak the language of", "Roberto
  Clemente's greatest weakness is"), first token and within 8 tokens;
- how many rephrases route to their own edit's block, and how many of those answer;
- neighbourhood locality (the records' locality prompts keep the base model's 4 tokens);
- the same subject's other relations (``bench.melo_keys.OTHER_RELATIONS``): the share
  whose 3 greedy tokens change;
- the daemon's drift check on its default probes (the shipped common facts): top-1
  agreement and mean KL against the base model, as ``[drift]`` judges them;
- seconds per edit (applying only).

``--set key=value`` overrides a ``[editors.melo]`` setting (repeatable; ``stop_nll`` is
the editor's training stop).

    .venv/bin/python -m bench.melo_generalisation --model var/models/smollm2-135m-instruct \\
        --n 100 --set stop_nll=0.002

Writes ``<out>/melo-generalisation-<model>-<N>[-<settings>].json``; prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.melo_keys import COUNTERFACT, OTHER_RELATIONS
from bench.stats import RESULTS, machine_info, markdown_table, write_result
from daemon.drift.commonfacts import probe_prompts
from daemon.drift.probes import Probe, score_base
from daemon.drift.scoring import score_edited
from daemon.editors.base import EditSpec
from daemon.editors.melo.config import MeloConfig
from daemon.editors.melo.editor import MeloEditor
from daemon.editors.noop import NoopEditor
from daemon.eval.loaders import convert
from daemon.eval.scoring import generate
from daemon.model.answers import continuation_matches
from daemon.model.loading import load_model

BATCH = 10
LEAD_SENTENCE = re.compile(r"[.!?]\s*$")


def leads_with_a_sentence(prompt: str, subject: str) -> bool:
    """ROME's paraphrase prompts: an unrelated sentence ends before the subject."""
    at = prompt.find(subject)
    return at > 0 and LEAD_SENTENCE.search(prompt[:at].rstrip()) is not None


def parse_settings(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs typed by ``MeloConfig``'s defaults (``stop_nll`` included)."""
    defaults = MeloConfig()
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        default = getattr(defaults, key)
        if isinstance(default, tuple):
            out[key] = tuple(int(v) for v in value.split(",") if v)
        else:
            out[key] = type(default)(value)
    return out


def share(flags: Sequence[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def run(model_dir: str, n: int, settings: dict[str, Any]) -> dict[str, Any]:
    loaded = load_model(model_dir, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    records = list(convert(COUNTERFACT, "counterfact", limit=n).requests)[:n]
    noop = NoopEditor()
    local = [p["prompt"] for r in records for p in r["locality"]]
    others = [t.format(r["subject"]) for r in records for t in OTHER_RELATIONS]
    base_local = generate(noop, model, tok, local, max_new_tokens=4)
    base_others = generate(noop, model, tok, others, max_new_tokens=3)
    probes = [Probe(p) for p in dict.fromkeys(probe_prompts())]
    base_scores = score_base(model, tok, probes)
    config = dataclasses.replace(MeloConfig(), **settings)
    editor = MeloEditor(model, tok, config, stop_nll=config.stop_nll)
    try:
        t0 = time.perf_counter()
        accepted = 0
        for start in range(0, n, BATCH):
            specs = [
                EditSpec(str(r["id"]), r["prompt"], r["target"], r.get("subject"))
                for r in records[start : start + BATCH]
            ]
            accepted += sum(o.accepted for o in editor.apply(specs))
        seconds = (time.perf_counter() - t0) / n
        prompts = [r["prompt"] for r in records]
        done = generate(editor, model, tok, prompts, max_new_tokens=8)
        efficacy = [
            continuation_matches(o, r["target"]) for o, r in zip(done, records, strict=True)
        ]
        pairs = [(p, r) for r in records for p in r.get("rephrases", [])]
        replies = generate(editor, model, tok, [p for p, _ in pairs], max_new_tokens=8)
        first = [
            continuation_matches(o, r["target"]) for o, (_, r) in zip(replies, pairs, strict=True)
        ]
        within = [r["target"].strip() in o for o, (_, r) in zip(replies, pairs, strict=True)]
        routes = editor.route_blocks([p for p, _ in pairs])
        own = [
            b is not None and b == editor.table.block_of(str(r["id"]))
            for b, (_, r) in zip(routes, pairs, strict=True)
        ]
        lead = [leads_with_a_sentence(p, r["subject"]) for p, r in pairs]
        edited_local = generate(editor, model, tok, local, max_new_tokens=4)
        edited_others = generate(editor, model, tok, others, max_new_tokens=3)
        drift = score_edited(model, tok, probes, base_scores, editor.routing)
    finally:
        editor.close()

    def split(flags: Sequence[bool], want: bool) -> float | None:
        return share([f for f, led in zip(flags, lead, strict=True) if led == want])

    return {
        "n": n,
        "accepted": accepted,
        "s_per_edit": round(seconds, 3),
        "efficacy": share(efficacy),
        "paraphrase": share(first),
        "paraphrase_within_8": share(within),
        "rephrases_routed_to_own_block": share(own),
        "answered_when_routed_to_own_block": share(
            [f for f, o in zip(first, own, strict=True) if o]
        ),
        "lead_sentence": {
            "count": sum(lead),
            "paraphrase": split(first, True),
            "within_8": split(within, True),
            "routed": split(own, True),
        },
        "other_prompts": {
            "count": len(lead) - sum(lead),
            "paraphrase": split(first, False),
            "within_8": split(within, False),
            "routed": split(own, False),
        },
        "locality": share([a == b for a, b in zip(base_local, edited_local, strict=True)]),
        "same_subject_other_relations_changed": share(
            [a != b for a, b in zip(base_others, edited_others, strict=True)]
        ),
        "drift_top1_agreement": round(drift.top1_agreement, 4),
        "drift_mean_kl": round(drift.mean_kl, 4),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--model", default="var/models/smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=RESULTS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = parse_settings(args.set)
    result = {
        "benchmark": "melo_generalisation",
        "model": Path(args.model).name,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
        "machine": machine_info(),
        "command": " ".join([".venv/bin/python -m bench.melo_generalisation", *argv]),
        **run(args.model, args.n, settings),
    }
    headers = ["settings", "edits", "efficacy", "paraphrase (lead sentence / other)",
               "routed to own block", "answered when routed", "locality",
               "same subject, other relations changed", "drift top-1", "drift KL",
               "s/edit"]  # fmt: skip
    lead, other = result["lead_sentence"], result["other_prompts"]
    row = [
        " ".join(args.set) or "defaults", result["n"], result["efficacy"],
        f"{result['paraphrase']} ({lead['paraphrase']} / {other['paraphrase']})",
        result["rephrases_routed_to_own_block"], result["answered_when_routed_to_own_block"],
        result["locality"], result["same_subject_other_relations_changed"],
        result["drift_top1_agreement"], result["drift_mean_kl"], result["s_per_edit"],
    ]  # fmt: skip
    print(markdown_table(headers, [row]))
    suffix = "".join(f"-{s.replace('=', '')}" for s in args.set)
    name = f"melo-generalisation-{Path(args.model).name}-{args.n}{suffix}.json"
    print(f"wrote {write_result(args.out, name, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
