"""Writing an evaluation: the JSON report (a contract: ``docs/contracts.md``), Markdown, a plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.eval.harness import CheckpointScores
from daemon.files import atomic_write_text

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_PNG = "report.png"

PLOTTED = ("efficacy", "paraphrase", "heldout", "locality", "retention", "base_task")


@dataclass(frozen=True)
class EvalReport:
    """What ``editd eval`` writes. ``to_json_dict`` keeps the shape in ``docs/contracts.md``."""

    editor: str
    model: str
    n_edits: int
    checkpoints: tuple[CheckpointScores, ...]
    settings: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "editor": self.editor,
            "model": self.model,
            "n_edits": self.n_edits,
            "checkpoints": [c.to_json_dict() for c in self.checkpoints],
            "settings": self.settings,
            "data": self.data,
        }


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def markdown_table(report: EvalReport) -> str:
    """One row per checkpoint: generation metrics, teacher-forced accuracy, CounterFact's
    probability metrics (ES / PS / NS, where the edits name their true answer), efficacy
    in the chat template (models that have one), cost."""
    head = (
        "| edits | efficacy | paraphrase | heldout | locality | retention | base task "
        "| TF efficacy | TF paraphrase | TF locality | ES | PS | NS | chat | s/edit | peak RSS MB |"
    )
    rule = "|" + "---|" * (head.count("|") - 1)
    lines = [f"### {report.editor} on {report.model} ({report.n_edits} edits)", "", head, rule]
    for c in report.checkpoints:
        tf, prob = c.teacher_forced, c.probability
        lines.append(
            f"| {c.edits} | {_fmt(c.efficacy)} | {_fmt(c.paraphrase)} | {_fmt(c.heldout)} "
            f"| {_fmt(c.locality)} | {_fmt(c.retention)} | {_fmt(c.base_task)} "
            f"| {_fmt(tf.get('efficacy'))} | {_fmt(tf.get('paraphrase'))} "
            f"| {_fmt(tf.get('locality'))} | {_fmt(prob.get('es'))} | {_fmt(prob.get('ps'))} "
            f"| {_fmt(prob.get('ns'))} | {_fmt(c.chat)} "
            f"| {c.seconds_per_edit:.3f} | {c.peak_rss_mb:.0f} |"
        )
    last = report.checkpoints[-1] if report.checkpoints else None
    ppl = [c for c in report.checkpoints if c.perplexity]
    if ppl:
        steps = ", ".join(f"{c.perplexity['edited']:.3f} at {c.edits}" for c in ppl)
        lines += [
            "",
            f"Perplexity on held-out text: {ppl[0].perplexity['base']:.3f} before, {steps}.",
        ]
    if last is not None and last.routing is not None:
        lines += ["", routing_line(last.routing)]
    return "\n".join(lines) + "\n"


def routing_line(routing: dict[str, Any]) -> str:
    """Where ``auto`` sent the edits, in words (routed first, then where they ended)."""
    routed, applied = routing.get("routed", {}), routing.get("applied", {})
    return (
        f"routing: routed hook {routed.get('hook', 0)}, melo {routed.get('melo', 0)}; "
        f"applied hook {applied.get('hook', 0)}, melo {applied.get('melo', 0)}; "
        f"escalated {routing.get('escalated', 0)}; failed {routing.get('failed', 0)}"
    )


def plot(report: EvalReport, path: Path) -> None:
    """A PNG with one panel per metric against the number of edits (log-scaled x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [c.edits for c in report.checkpoints]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), sharex=True)
    for ax, metric in zip(axes.flat, PLOTTED, strict=True):
        ys = [getattr(c, metric) for c in report.checkpoints]
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_title(metric)
        ax.set_ylim(-0.02, 1.02)
        if len(set(xs)) > 1 and min(xs) > 0:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("edits applied")
    fig.suptitle(f"{report.editor} on {report.model}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: EvalReport, out_dir: Path) -> Sequence[Path]:
    """Write report.json, report.md and report.png into ``out_dir``; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = out_dir / REPORT_JSON, out_dir / REPORT_MD, out_dir / REPORT_PNG
    atomic_write_text(json_path, json.dumps(report.to_json_dict(), indent=2) + "\n")
    atomic_write_text(md_path, markdown_table(report))
    plot(report, png_path)
    return (json_path, md_path, png_path)
