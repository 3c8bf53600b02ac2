"""Routing quality of the editors, for ``bench.inference``: how often each back-end's
routing fires on edit prompts, rephrases, held-out rephrases, locality prompts and
probes (the hook's scope gate at the key site; MELO's index)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, cast

import numpy as np
import torch

from daemon.drift.probes import left_padded
from daemon.model.batches import padded_forward_inputs
from daemon.model.loading import LoadedModel

GATE_BATCH = 64


def probe_groups(records: Sequence[dict[str, Any]], probes: Sequence[str]) -> dict[str, Any]:
    """Prompts by group, each with the index of its edit (-1: none), for routing checks."""
    groups: dict[str, tuple[list[str], list[int]]] = {
        k: ([], []) for k in ("edit", "rephrase", "heldout", "locality", "probe")
    }
    edit_prompts = {r["prompt"] for r in records}

    def add(group: str, prompt: str, owner: int) -> None:
        groups[group][0].append(prompt)
        groups[group][1].append(owner)

    for i, r in enumerate(records):
        add("edit", r["prompt"], i)
        for p in r.get("rephrases", []):
            add("rephrase", p, i)
        for p in r.get("heldout_rephrases", []):
            add("heldout", p, i)
        for item in r.get("locality", []):
            if item["prompt"] not in edit_prompts:
                add("locality", item["prompt"], -1)
    for p in probes:
        if p not in edit_prompts:
            add("probe", p, -1)
    return groups


@torch.no_grad()
def hook_routes(
    loaded: LoadedModel, hooks: dict[int, Any], prompts: Sequence[str]
) -> tuple[dict[int, list[int]], dict[int, list[bool]]]:
    """Per layer: the shard at each prompt's key site (-1: closed), and whether any token fired."""
    site: dict[int, list[int]] = {i: [] for i in hooks}
    anywhere: dict[int, list[bool]] = {i: [] for i in hooks}
    for start in range(0, len(prompts), GATE_BATCH):
        chunk = list(prompts[start : start + GATE_BATCH])
        ids, mask = left_padded(loaded.tokenizer, chunk)
        cast(Any, loaded.model)(**padded_forward_inputs(ids, mask), use_cache=False)
        for i, hook in hooks.items():
            route = hook.last_route
            if route is None:  # no delta applied: the gate never opens
                route = torch.full(ids.shape, -1, dtype=torch.long)
            site[i].extend(route[:, -1].tolist())  # left padding: the last prompt token
            fired = (route >= 0) & mask.bool()
            anywhere[i].extend(fired.any(dim=1).tolist())
    return site, anywhere


def _rate(flags: Sequence[bool]) -> float:
    return round(sum(flags) / len(flags), 4) if flags else float("nan")


def hook_gate_stats(loaded: LoadedModel, editor: Any, groups: dict[str, Any]) -> dict[str, Any]:
    """Gate firing rates per group, per hook layer and in any layer (see the module doc)."""
    hooks: dict[int, Any] = editor.hooks
    own: dict[int, list[int]] = {}
    out: dict[str, Any] = {}
    for name in ("edit", "rephrase", "heldout", "locality", "probe"):
        prompts, owners = groups[name]
        site, anywhere = hook_routes(loaded, hooks, prompts)
        if name == "edit":
            own = site  # the shard the edit's own prompt routes to, per layer
        row: dict[str, Any] = {"n": len(prompts)}
        for i in hooks:
            row[f"site_fires_L{i}"] = _rate([s >= 0 for s in site[i]])
            if name in ("locality", "probe"):
                row[f"any_token_fires_L{i}"] = _rate(anywhere[i])
        row["site_fires_any_layer"] = _rate(
            [any(site[i][k] >= 0 for i in hooks) for k in range(len(prompts))]
        )
        if name in ("locality", "probe"):
            row["any_token_fires_any_layer"] = _rate(
                [any(anywhere[i][k] for i in hooks) for k in range(len(prompts))]
            )
        else:
            row["site_own_shard_all_layers"] = _rate(
                [
                    all(site[i][k] >= 0 and site[i][k] == own[i][o] for i in hooks)
                    for k, o in enumerate(owners)
                ]
            )
        out[name] = row
    out["false_negative_rephrase"] = round(1.0 - out["rephrase"]["site_fires_any_layer"], 4)
    out["false_negative_heldout"] = round(1.0 - out["heldout"]["site_fires_any_layer"], 4)
    out["false_positive_locality"] = out["locality"]["site_fires_any_layer"]
    out["false_positive_locality_any_token"] = out["locality"]["any_token_fires_any_layer"]
    out["false_positive_probe"] = out["probe"]["site_fires_any_layer"]
    return out


def melo_route_stats(editor: Any, groups: dict[str, Any]) -> dict[str, Any]:
    """How MELO's index routes each group: to any block, and to the edit's own block."""
    own: list[int | None] = []
    out: dict[str, Any] = {}
    for name in ("edit", "rephrase", "heldout", "locality", "probe"):
        prompts, owners = groups[name]
        blocks: list[int | None] = []
        for start in range(0, len(prompts), GATE_BATCH):
            blocks.extend(editor.route_blocks(prompts[start : start + GATE_BATCH]))
        if name == "edit":
            own = blocks
        row: dict[str, Any] = {"n": len(prompts), "routed": _rate([b is not None for b in blocks])}
        if name not in ("locality", "probe"):
            row["routed_own_block"] = _rate(
                [b is not None and b == own[o] for b, o in zip(blocks, owners, strict=True)]
            )
        out[name] = row
    out["false_negative_rephrase"] = round(1.0 - out["rephrase"]["routed"], 4)
    out["false_negative_heldout"] = round(1.0 - out["heldout"]["routed"], 4)
    out["false_positive_locality"] = out["locality"]["routed"]
    out["false_positive_probe"] = out["probe"]["routed"]
    return out


# --- one editor ---------------------------------------------------------------------------


# --- routing cost -------------------------------------------------------------------------


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    """Median wall seconds of ``fn()`` over ``reps`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def index_search_cost(index: Any, queries: np.ndarray, reps: int) -> dict[str, Any]:
    """A ``NeuronIndex``'s search time per query: in batches of ``GATE_BATCH``/2 and alone."""
    batch = queries[: GATE_BATCH // 2]
    per_batch = median_seconds(lambda: index.query(batch), reps)
    single = median_seconds(lambda: index.query(queries[:1]), reps)
    return {
        "keys": index.key_count,
        "clusters": index.cluster_count,
        "approximate": index.is_approximate,
        "us_per_query_batched": round(per_batch / len(batch) * 1e6, 2),
        "us_single_query": round(single * 1e6, 2),
    }


def synthetic_index_costs(
    dim: int, radius: float, exact_max: int, sizes: Sequence[int], queries: np.ndarray, reps: int
) -> list[dict[str, Any]]:
    """Search cost of a ``NeuronIndex`` holding N random unit keys (each its own cluster),
    for each N of ``sizes``: the index at sizes the edit file cannot reach."""
    from daemon.editors.melo.index import NeuronIndex

    index = NeuronIndex(dim, radius=min(radius, 0.5), exact_max=exact_max)
    keys = np.random.default_rng(0).standard_normal((max(sizes, default=0), dim))
    keys = (keys / np.linalg.norm(keys, axis=1, keepdims=True)).astype(np.float32)
    out = []
    for size in sorted(sizes):
        t0 = time.perf_counter()
        for row in range(index.key_count, size):
            index.add(f"synthetic-{row}", keys[row], f" t{row}", row)
        build_s = time.perf_counter() - t0
        cost = index_search_cost(index, queries, reps) if size else {"keys": 0}
        out.append({"size": size, "added_s": round(build_s, 2), **cost})
    return out


@torch.no_grad()
def hook_gate_cost(
    loaded: LoadedModel, editor: Any, prompts: Sequence[str], reps: int
) -> dict[str, Any]:
    """The scope gate's routing time per token position: each hook's ``route`` on the
    inputs it saw in one forward of ``prompts`` (one batch), timed on its own."""
    hooks: dict[int, Any] = editor.hooks
    ids, mask = left_padded(loaded.tokenizer, list(prompts))
    seen: dict[int, torch.Tensor] = {}

    def keep(layer: int) -> Callable[[Any, tuple[torch.Tensor, ...]], None]:
        return lambda _module, inputs: seen.__setitem__(layer, inputs[0].detach())

    handles = [h.register_forward_pre_hook(keep(i)) for i, h in hooks.items()]
    try:
        with editor.routing(list(prompts)):
            cast(Any, loaded.model)(**padded_forward_inputs(ids, mask), use_cache=False)
            route_s = {i: median_seconds(partial(h.route, seen[i]), reps) for i, h in hooks.items()}
    finally:
        for handle in handles:
            handle.remove()
    return {
        "positions": ids.numel(),
        "real_tokens": int(mask.sum()),
        "keys": {str(i): int(h.keys.shape[0]) for i, h in hooks.items()},
        "route_ms": {str(i): round(s * 1000, 3) for i, s in route_s.items()},
        "us_per_token_all_layers": round(sum(route_s.values()) / ids.numel() * 1e6, 3),
    }


def routing_cost(
    name: str, editor: Any, loaded: LoadedModel, prompts: list[str], reps: int
) -> dict[str, Any]:
    """The live routing alone: MELO's index search per query, the hook's gate per token."""
    try:
        if name == "melo":
            if editor.index is None or editor.index.key_count == 0:
                return {"keys": 0}
            return index_search_cost(editor.index, editor.keys(prompts), reps)
        return hook_gate_cost(loaded, editor, prompts[: GATE_BATCH // 2], reps)
    except Exception as e:  # a measurement beside the benchmark: report it and go on
        return {"error": f"{type(e).__name__}: {e}"}


def melo_synthetic_costs(
    editor: Any, exact_max: int, sizes: Sequence[int], prompts: Sequence[str], reps: int
) -> list[dict[str, Any]]:
    """``synthetic_index_costs`` at MELO's key width and radius, queried with real keys."""
    radius = 0.5 if editor.index is None else editor.index.radius
    queries = editor.keys(list(prompts))
    return synthetic_index_costs(editor.keys.dim, radius, exact_max, sizes, queries, reps)


def editor_facts(name: str, editor: Any) -> dict[str, Any]:
    """What the routing holds: the hook's layers, shards and gate keys; MELO's index."""
    if name == "hook":
        health = editor.health()
        return {
            "layers": list(editor.layout.layers),
            "key_position": editor.layout.key_position,
            "gate_cos_floor": editor.config.gate_cos_floor,
            "shards": health["shards"],
            "gate_keys": health["gate_keys"],
        }
    index = editor.index
    return {
        "layers": list(editor.layers),
        "key_layer": editor.key_layer,
        "edits": len(editor.applied_ids()),
        "index_keys": 0 if index is None else index.key_count,
        "blocks_used": editor.table.used,
    }
