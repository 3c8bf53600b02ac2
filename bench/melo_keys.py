"""Which routing key could send a CounterFact rephrase to its MELO block, and at what price.

MELO routes a prompt to an edit's LoRA block when the prompt's key lies within a radius
of the edit's stored key. Its key is the residual stream at the prompt's LAST token, at
the key layer below the LoRA layers (``daemon.editors.melo.keys``). On a real model that
routes no rephrase (issue 17). This measures, on records 0..N-1 of CounterFact, before
and after training each record's block:

1. **Last-token keys** (MELO's): the cosine of each rephrase to its own edit prompt
   against that of the neighbourhood prompts (other subjects, same relation) to their
   nearest edit prompt, and how often a rephrase's nearest edit prompt is its own.
2. **Subject keys**: the residual at the subject's last token (found in the rephrase by
   the subject's token n-grams, as the hook's subject gate finds it): how often the
   subject is found, the cosine to the edit prompt's subject key, the cosine of each
   edit's subject key to the nearest OTHER edit's, and how often a rephrase's nearest
   subject key is its own edit's. Sections 1-2 run at MELO's prompt_last key layer and
   at its subject_last key layer (a third of the way up).
3. **Can any last-token threshold tell a rephrase from another relation of the same
   subject?** Cosines of rephrases against those of held-out same-subject prompts with
   other relations (``OTHER_RELATIONS``), at several layers up to the key layer.
4. **Forced routing** (the best any key could do): each edit trained into its own block
   by ``MeloEditor.apply``, then its rephrase and the same-subject other-relation prompts
   sent to that block. Paraphrase = the rephrase's greedy continuation starts with the
   new target; bleed = share of other-relation prompts whose 3-token greedy
   continuation changes.

5. **The hook, for comparison** (``--config`` given): the same records applied by the
   hook editor as the daemon builds it (batches of 10), then the same rephrases and
   other-relation prompts under its routing.

Prints a table and writes ``<results>/melo-keys-<model>.json``.

    .venv/bin/python -m bench.melo_keys --model var/models/smollm2-135m-instruct --n 200
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from daemon.editors.base import EditSpec
from daemon.editors.melo.config import MeloConfig
from daemon.editors.melo.editor import MeloEditor
from daemon.editors.melo.routing import route_rows
from daemon.model import arch
from daemon.model.answers import continuation_matches
from daemon.model.generate import greedy_continuations
from daemon.model.loading import LoadedModel, load_model
from daemon.model.tokens import subject_grams

REPO = Path(__file__).resolve().parent.parent
COUNTERFACT = REPO.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json"
OTHER_RELATIONS = (
    "{} was founded in",
    "The native language of {} is",
    "{} is a citizen of",
    "{} died in",
    "{} is part of",
    "{} was born in",
    "{} is located in the country of",
    "{} works in the field of",
)
THRESHOLDS = (0.6, 0.7, 0.8, 0.9)
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


@torch.no_grad()
def unit_states(loaded: LoadedModel, text: str, layer: int) -> tuple[list[int], torch.Tensor]:
    """Token ids of ``text`` and its unit-norm residual after block ``layer``, ``[T, d]``."""
    enc = loaded.tokenizer(text, return_tensors="pt")
    out = loaded.model(**enc, output_hidden_states=True)
    hidden = out.hidden_states[layer + 1][0].float()
    return enc["input_ids"][0].tolist(), torch.nn.functional.normalize(hidden, dim=-1)


def subject_end(row: Sequence[int], grams: frozenset[tuple[int, ...]]) -> int | None:
    """The last position of the last occurrence of any of ``grams`` in ``row``."""
    ends = [
        s + len(g) - 1
        for g in grams
        for s in range(len(row) - len(g) + 1)
        if tuple(row[s : s + len(g)]) == g
    ]
    return max(ends) if ends else None


def quantiles(values: torch.Tensor) -> list[float]:
    return [round(float(q), 3) for q in np.quantile(values.numpy(), QUANTILES)]


def key_geometry(
    loaded: LoadedModel, records: Sequence[dict[str, Any]], layer: int
) -> dict[str, Any]:
    """Sections 1 and 2 at ``layer``."""
    tok = loaded.tokenizer
    last_k, last_p, last_n, subj_k, subj_p = [], [], [], [], []
    for r in records:
        grams = subject_grams(tok, r["subject"], r["prompt"])
        row, h = unit_states(loaded, r["prompt"], layer)
        last_k.append(h[-1])
        end = subject_end(row, grams)
        subj_k.append(h[end if end is not None else -1])
        row, h = unit_states(loaded, r["rephrase_prompt"], layer)
        last_p.append(h[-1])
        end = subject_end(row, grams)
        subj_p.append(h[end] if end is not None else None)
        last_n.append(unit_states(loaded, r["locality_prompt"], layer)[1][-1])
    keys, para, neigh = torch.stack(last_k), torch.stack(last_p), torch.stack(last_n)
    subject_keys = torch.stack(subj_k)
    found = [i for i, k in enumerate(subj_p) if k is not None]
    subject_para = torch.stack([k for k in subj_p if k is not None])
    subj_cos = (subject_para * subject_keys[found]).sum(1)
    others = subject_keys @ subject_keys.T
    others.fill_diagonal_(-1.0)
    subject_nearest_own = (subject_para @ subject_keys.T).argmax(1) == torch.tensor(found)
    sim = para @ keys.T
    own = sim.diagonal()
    nearest_own = sim.argmax(1) == torch.arange(len(records))
    neigh_max = (neigh @ keys.T).max(1).values
    return {
        "layer": layer,
        "rephrase_nearest_is_own": float(nearest_own.float().mean()),
        "rephrase_own_cos": quantiles(own),
        "neighbour_nearest_cos": quantiles(neigh_max),
        "by_threshold": {
            str(t): {
                "rephrase_routed_own": float(((own >= t) & nearest_own).float().mean()),
                "neighbour_routed": float((neigh_max >= t).float().mean()),
            }
            for t in THRESHOLDS
        },
        "subject_found_in_rephrase": len(found) / len(records),
        "rephrase_subject_key_cos": quantiles(subj_cos),
        "nearest_other_subject_key_cos": quantiles(others.max(1).values),
        "rephrase_subject_key_nearest_is_own": float(subject_nearest_own.float().mean()),
    }


def relation_separation(
    loaded: LoadedModel, records: Sequence[dict[str, Any]], layer: int
) -> dict[str, Any]:
    """Section 3 at ``layer``: last-token cosines to the edit prompt."""
    para, other = [], []
    for r in records:
        key = unit_states(loaded, r["prompt"], layer)[1][-1]
        para.append(float(unit_states(loaded, r["rephrase_prompt"], layer)[1][-1] @ key))
        for template in OTHER_RELATIONS:
            text = template.format(r["subject"])
            other.append(float(unit_states(loaded, text, layer)[1][-1] @ key))
    p, o = torch.tensor(para), torch.tensor(other)
    return {
        "layer": layer,
        "rephrase_cos": quantiles(p),
        "same_subject_other_relation_cos": quantiles(o),
        "pass_rates": {
            str(t): {
                "rephrase": float((p >= t).float().mean()),
                "other": float((o >= t).float().mean()),
            }
            for t in THRESHOLDS
        },
    }


def forced_routing(loaded: LoadedModel, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Section 4: each edit in its own block, rephrases and other relations sent there."""
    model, tok = loaded.model, loaded.tokenizer
    editor = MeloEditor(model, tok, MeloConfig())
    try:
        specs = [
            EditSpec(f"e{i}", r["prompt"], r["target_new"], subject=r["subject"])
            for i, r in enumerate(records)
        ]
        outcomes = editor.apply(specs)
        hits, changed, total_other = 0, 0, 0
        applied = 0
        for r, spec, outcome in zip(records, specs, outcomes, strict=True):
            block = editor.table.block_of(spec.edit_id)
            if not outcome.accepted or block is None:
                continue
            applied += 1
            with route_rows([block]):
                reply = greedy_continuations(model, tok, [r["rephrase_prompt"]], max_new_tokens=5)
            hits += continuation_matches(reply[0], " " + r["target_new"].strip())
            others = [t.format(r["subject"]) for t in OTHER_RELATIONS]
            with route_rows([None] * len(others)):
                base = greedy_continuations(model, tok, others, max_new_tokens=3)
            with route_rows([block] * len(others)):
                edited = greedy_continuations(model, tok, others, max_new_tokens=3)
            changed += sum(a != b for a, b in zip(base, edited, strict=True))
            total_other += len(others)
        return {
            "applied": applied,
            "rephrase_target_first": hits / max(applied, 1),
            "other_relation_changed": changed / max(total_other, 1),
        }
    finally:
        editor.close()


def hook_comparison(
    loaded: LoadedModel, records: Sequence[dict[str, Any]], config: Path
) -> dict[str, Any]:
    """Section 5: the hook editor on the same records, batches of 10."""
    from daemon.config import cache_dir, load_config
    from daemon.editors.hook.setup import build_hook_editor

    model, tok = loaded.model, loaded.tokenizer
    others = [t.format(r["subject"]) for r in records for t in OTHER_RELATIONS]
    base = greedy_continuations(model, tok, others, max_new_tokens=3)
    cfg = load_config(config)
    editor = build_hook_editor(loaded, cfg.editors.hook, cache_dir=cache_dir(cfg))
    specs = [
        EditSpec(f"e{i}", r["prompt"], r["target_new"], subject=r["subject"])
        for i, r in enumerate(records)
    ]
    applied = {
        o.edit_id
        for s in range(0, len(specs), 10)
        for o in editor.apply(specs[s : s + 10])
        if o.accepted
    }
    with editor.routing(others):
        after = greedy_continuations(model, tok, others, max_new_tokens=3)
    rephrases = [r["rephrase_prompt"] for r in records]
    with editor.routing(rephrases):
        replies = greedy_continuations(model, tok, rephrases, max_new_tokens=5)
    k = len(OTHER_RELATIONS)
    kept = [i for i, s in enumerate(specs) if s.edit_id in applied]
    changed = sum(base[i * k + j] != after[i * k + j] for i in kept for j in range(k))
    hits = sum(
        continuation_matches(replies[i], " " + records[i]["target_new"].strip()) for i in kept
    )
    return {
        "applied": len(kept),
        "rephrase_target_first": hits / max(len(kept), 1),
        "other_relation_changed": changed / max(len(kept) * k, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--n", type=int, default=200, help="CounterFact records 0..N-1")
    p.add_argument("--forced", type=int, default=30, help="records trained for section 4")
    p.add_argument("--counterfact", type=Path, default=COUNTERFACT)
    p.add_argument("--config", type=Path, help="editd config: also run the hook (section 5)")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    records = json.loads(args.counterfact.read_text())[: args.n]
    key_layer = arch.default_key_layer(loaded.model)
    subject_layer = min(arch.num_layers(loaded.model) // 3, key_layer)  # subject_last's
    layers = sorted({max(0, key_layer // 4), key_layer // 2, key_layer})
    geometry = [key_geometry(loaded, records, k) for k in sorted({subject_layer, key_layer})]
    separation = [relation_separation(loaded, records[: max(1, args.n // 4)], k) for k in layers]
    forced = forced_routing(loaded, records[: args.forced])
    hook = None
    if args.config is not None:
        fresh = load_model(args.model, device="cpu", dtype="float32")
        hook = hook_comparison(fresh, records[: args.forced], args.config)
    result = {
        "model": Path(args.model).name,
        "n": args.n,
        "key_layer": key_layer,
        "subject_key_layer": subject_layer,
        "geometry": geometry,
        "separation": separation,
        "forced": forced,
        "hook": hook,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"melo-keys-{Path(args.model).name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"records 0..{args.n - 1}; prompt_last key layer {key_layer}")
    for g in geometry:
        print(f"layer {g['layer']}")
        print("| threshold | rephrase routed to own (last token) | neighbour routed |")
        print("|---|---|---|")
        for t, row in g["by_threshold"].items():
            print(f"| {t} | {row['rephrase_routed_own']:.3f} | {row['neighbour_routed']:.3f} |")
        print(
            f"last token: rephrase nearest is own {g['rephrase_nearest_is_own']:.3f}; subject "
            f"found in rephrase {g['subject_found_in_rephrase']:.3f}; subject key: rephrase "
            f"cos {g['rephrase_subject_key_cos']}, nearest other subject "
            f"{g['nearest_other_subject_key_cos']}, rephrase nearest is own "
            f"{g['rephrase_subject_key_nearest_is_own']:.3f}"
        )
    print("| layer | rephrase cos (q10/25/50/75/90) | same subject, other relation | ")
    print("|---|---|---|")
    for s in separation:
        print(f"| {s['layer']} | {s['rephrase_cos']} | {s['same_subject_other_relation_cos']} |")
    print(
        f"forced routing, {forced['applied']} edits: rephrase answers the target "
        f"{forced['rephrase_target_first']:.3f}; other relations of the subject changed "
        f"{forced['other_relation_changed']:.3f}"
    )
    if hook is not None:
        print(
            f"hook, {hook['applied']} edits: rephrase answers the target "
            f"{hook['rephrase_target_first']:.3f}; other relations of the subject changed "
            f"{hook['other_relation_changed']:.3f}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
