"""Tables and plots of the merged lifelong results (``bench/lifelong.py``).

A *series* is one editor on one model and one edit set. Its points are the
checkpoints of its runs; where two runs score the same edit count (a 1,000-edit run
and a longer one), the longer run's point is used, so each count appears once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

METRICS = (
    "efficacy",
    "paraphrase",
    "heldout",
    "locality",
    "retention",
    "base_task",
    "seconds_per_edit",
)
COLUMNS = (
    ("efficacy", "efficacy"),
    ("paraphrase", "paraphrase"),
    ("heldout", "heldout"),
    ("locality", "locality"),
    ("retention", "retention"),
    ("base_task", "base task"),
    ("seconds_per_edit", "s/edit"),
    ("refused", "refused"),
    ("routing", "auto: hook/melo/esc/failed"),
    ("run", "run"),
)
EDITOR_ORDER = ("hook", "melo", "auto", "ft", "noop")
DATA_ORDER = ("world", "counterfact", "zsre")

SeriesKey = tuple[str, str, str]  # (model, data, editor)


def _rank(value: str, order: Sequence[str]) -> int:
    return order.index(value) if value in order else len(order)


def series(runs: Sequence[dict[str, Any]]) -> dict[SeriesKey, list[dict[str, Any]]]:
    """Checkpoints per (model, data, editor), one per edit count, by edit count."""
    by_key: dict[SeriesKey, dict[int, tuple[int, dict[str, Any]]]] = {}
    for run in runs:
        key = (run["model"], run["data"], run["editor"])
        points = by_key.setdefault(key, {})
        reused = str(run.get("source", "")).startswith("reused")
        name = run.get("id", "").rsplit("/", 1)[-1] + (" (reused)" if reused else "")
        for point in run["report"]["checkpoints"]:
            held = points.get(point["edits"])
            if held is None or run["n_edits"] > held[0]:
                points[point["edits"]] = (run["n_edits"], {**point, "run": name})
    ordered = sorted(
        by_key, key=lambda k: (k[0], _rank(k[1], DATA_ORDER), _rank(k[2], EDITOR_ORDER))
    )
    return {k: [by_key[k][e][1] for e in sorted(by_key[k])] for k in ordered}


def _cell(value: Any, column: str) -> str:
    if value is None:
        return "-"
    if column == "refused":
        return str(int(value))
    if column == "routing":  # applied per back-end, escalated, failed (editor auto)
        applied = value.get("applied", {})
        counts = (applied.get("hook", 0), applied.get("melo", 0))
        return "/".join(str(v) for v in (*counts, value["escalated"], value["failed"]))
    if isinstance(value, str):
        return value
    return f"{value:.3f}"


def markdown_tables(runs: Sequence[dict[str, Any]]) -> str:
    """One table per model and edit set; rows editor x edits."""
    groups: dict[tuple[str, str], list[str]] = {}
    head = "| editor | edits | " + " | ".join(label for _, label in COLUMNS) + " |"
    rule = "|" + "---|" * (len(COLUMNS) + 2)
    for (model, data, editor), points in series(runs).items():
        rows = groups.setdefault((model, data), [head, rule])
        for p in points:
            cells = " | ".join(_cell(p.get(c), c) for c, _ in COLUMNS)
            rows.append(f"| {editor} | {p['edits']:,} | {cells} |")
    out = []
    for (model, data), rows in groups.items():
        title = model if data == "world" else f"{model}, {data} edits"
        out.append(f"### {title}\n\n" + "\n".join(rows) + "\n")
    return "\n".join(out)


def draw_metrics(runs: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """``lifelong-<metric>.png`` per metric: x = edits (log), one line per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = series(runs)
    models = sorted({k[0] for k in lines})
    colours = {e: f"C{i}" for i, e in enumerate(EDITOR_ORDER)}
    styles = ("-", "--", ":", "-.")
    markers = {"world": "o", "counterfact": "s", "zsre": "^"}
    paths = []
    for metric in METRICS:
        fig, ax = plt.subplots(figsize=(9.5, 4.5))
        for (model, data, editor), points in lines.items():
            pts = [(p["edits"], p[metric]) for p in points if p.get(metric) is not None]
            if not pts:
                continue
            label = f"{editor} · {model}" + ("" if data == "world" else f" · {data}")
            ax.plot(
                [x for x, _ in pts],
                [y for _, y in pts],
                color=colours.get(editor, "k"),
                linestyle=styles[models.index(model) % len(styles)],
                marker=markers.get(data, "x"),
                label=label,
            )
        ax.set_xscale("log")
        if metric == "seconds_per_edit":
            ax.set_ylabel("seconds per edit")
        else:
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel(metric.replace("_", " ") + " (greedy generation)")
        ax.set_xlabel("edits applied")
        ax.set_title(f"lifelong editing: {metric.replace('_', ' ')}")
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        path = out_dir / f"lifelong-{metric}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


# --- bench.inference ------------------------------------------------------------------------


def _routing_cell(cost: dict[str, Any]) -> str:
    if "us_per_query_batched" in cost:
        return f"index search {cost['us_per_query_batched']:.1f} us/query"
    if "us_per_token_all_layers" in cost:
        return f"gate {cost['us_per_token_all_layers']:.2f} us/token"
    return str(cost.get("error", "-"))[:60]


def inference_table(results: Sequence[dict[str, Any]]) -> str:
    """``bench.inference``: one row per editor and size, then MELO's synthetic index
    search times and each editor's routing quality."""
    lines = [
        "| editor | edits | greedy base s | greedy edited s | ratio | fixed-step ratio "
        "| tok/s base | tok/s edited | forward ratio | routing alone |",
        "|---" * 10 + "|",
    ]
    notes = []
    for r in results:
        for s in r["by_size"]:
            if "skipped" in s:
                lines.append(f"| {r['editor']} | {s['edits']:,} | skipped: {s['skipped']} |")
                continue
            g, f, fw = s["generation"], s["generation_fixed_steps"], s["forward"]
            lines.append(
                f"| {r['editor']} | {s['edits']:,} | {g['median_base_s']:.4f} "
                f"| {g['median_edited_s']:.4f} | {g['ratio']:.3f} | {f['ratio']:.3f} "
                f"| {f['tokens_per_s_base']:.0f} | {f['tokens_per_s_edited']:.0f} "
                f"| {fw['ratio']:.3f} | {_routing_cell(s['routing_cost'])} |"
            )
        for row in r.get("index_search_synthetic", []):
            if row["size"]:
                notes.append(
                    f"melo index, {row['size']:,} synthetic keys: "
                    f"{row['us_per_query_batched']:.1f} us/query in batches of 32, "
                    f"{row['us_single_query']:.1f} us alone (approximate: {row['approximate']})"
                )
        q = r.get("routing_quality")
        if q:
            notes.append(
                f"{r['editor']} routing ({q['edits_checked']} edits): "
                f"FN rephrase {q['false_negative_rephrase']:.3f}, "
                f"FN held-out {q['false_negative_heldout']:.3f}, "
                f"FP locality {q['false_positive_locality']:.3f}, "
                f"FP probes {q['false_positive_probe']:.3f}"
            )
    return "\n".join(["", *lines, "", *notes])
