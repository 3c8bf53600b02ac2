"""``bench.lifelong``: the grid, the merged JSON, the tables and the plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import lifelong, plots


def _argv(micro_world: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        *("--models", str(micro_world), "--data", "world"),
        *("--edits-dir", str(tmp_path / "edits"), "--results", str(tmp_path / "results")),
        *extra,
    ]


def _run(model: str, editor: str, n: int, points: list[tuple[int, float]]) -> dict[str, Any]:
    checkpoints = [
        {"edits": e, "efficacy": v, "seconds_per_edit": 0.1, "refused": 0} for e, v in points
    ]
    return {
        "model": model,
        "data": "world",
        "editor": editor,
        "n_edits": n,
        "report": {"checkpoints": checkpoints},
    }


def test_series_takes_each_edit_count_from_the_longest_run() -> None:
    """Two runs of one editor that both score 10 edits give one point, the longer run's."""
    runs = [_run("m", "melo", 100, [(10, 0.5), (100, 0.4)]), _run("m", "melo", 10, [(10, 0.9)])]
    points = plots.series(runs)[("m", "world", "melo")]
    assert [(p["edits"], p["efficacy"]) for p in points] == [(10, 0.5), (100, 0.4)]
    table = plots.markdown_tables(runs)
    assert table.startswith("### m\n") and "| melo | 100 | 0.400 |" in table


def test_reusable_needs_the_same_stream_and_its_checkpoints(tmp_path: Path) -> None:
    """An earlier report is adopted only for the same editor, model, edits, n and batch
    size, without rephrases, and only if it scored every requested checkpoint."""
    run = lifelong.Run(
        "m",
        tmp_path / "m",
        "hook",
        "world",
        tmp_path / "e.jsonl",
        "editd",
        100,
        (10, 100),
        10,
        None,
    )
    report = {
        "editor": "hook",
        "model": str(tmp_path / "m"),
        "n_edits": 100,
        "checkpoints": [{"edits": 10}, {"edits": 50}, {"edits": 100}],
        "settings": {"batch_size": 10, "send_rephrases": False},
        "data": {"edits": str(tmp_path / "e.jsonl")},
    }
    assert lifelong.reusable(run, report)
    assert not lifelong.reusable(run, {**report, "settings": {"batch_size": 1}})
    assert not lifelong.reusable(run, {**report, "checkpoints": [{"edits": 100}]})
    assert not lifelong.reusable(run, {**report, "editor": "melo"})


def test_plan_caps_the_world_edit_set_and_plans_auto(
    micro_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Past the facts that qualify, the largest run is the maximum, recorded as capped;
    ``auto`` is an ``editd eval`` editor like the others, in batches of 10."""
    argv = _argv(micro_world, tmp_path, "--editors", "melo,auto", "--n", "5,100000", "--dry-run")
    args = lifelong.parser().parse_args(argv)
    runs, skipped = lifelong.plan(args)
    assert [r.editor for r in runs] == ["melo", "auto"] and skipped == []
    run = runs[0]
    assert run.capped_from == 100000 and 5 < run.n < 100000
    assert run.checkpoints == (5, run.n) and run.name == f"melo-{run.n}"
    assert lifelong.count_lines(run.edits) == run.n and run.edits.name.endswith("-max.jsonl")
    assert runs[1].batch_size == 10 and "auto" in runs[1].command(tmp_path)
    assert lifelong.main(argv) == 0
    assert "planned" in capsys.readouterr().out


def test_auto_runs_record_their_routing_counts(tmp_path: Path) -> None:
    """The merged entry of an ``auto`` run carries the last checkpoint's routing counts,
    and the table shows them (applied hook/melo, escalated, failed)."""
    routing = {
        "routed": {"hook": 7, "melo": 3},
        "applied": {"hook": 5, "melo": 4},
        "escalated": 2,
        "failed": 1,
    }
    out_dir = tmp_path / "lifelong" / "m" / "auto-10"
    out_dir.mkdir(parents=True)
    report = {
        "editor": "auto",
        "n_edits": 10,
        "checkpoints": [
            {
                "edits": 10,
                "efficacy": 0.9,
                "seconds_per_edit": 0.1,
                "refused": 1,
                "routing": routing,
            }
        ],
    }
    (out_dir / "report.json").write_text(json.dumps(report))
    entry = lifelong.run_entry(out_dir, tmp_path / "lifelong")
    assert entry is not None and entry["routing"] == routing
    table = plots.markdown_tables([entry, _run("m", "melo", 10, [(10, 0.5)])])
    assert "| auto | 10 | 0.900 |" in table and "| 5/4/2/1 |" in table
    assert "auto: hook/melo/esc/failed" in table


@pytest.mark.slow
def test_grid_writes_reports_merged_json_tables_and_plots(
    micro_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ft and melo at 4 and 8 edits: one run each (8 edits, checkpoints 4 and 8), merged
    into lifelong.json, one table, one PNG per metric; --resume then runs nothing."""
    argv = _argv(micro_world, tmp_path, "--editors", "ft,melo", "--n", "4,8")
    assert lifelong.main(argv) == 0
    results = tmp_path / "results"
    merged = json.loads((results / "lifelong.json").read_text())
    assert sorted(r["id"] for r in merged["runs"]) == [
        f"{micro_world.name}/ft-8",
        f"{micro_world.name}/melo-8",
    ]
    for run in merged["runs"]:
        assert [c["edits"] for c in run["report"]["checkpoints"]] == [4, 8]
        assert run["batch_size"] == (1 if run["editor"] == "ft" else 10)
        assert (results / "lifelong" / run["id"] / "report.md").is_file()
    melo = next(r for r in merged["runs"] if r["editor"] == "melo")
    assert melo["report"]["checkpoints"][-1]["efficacy"] > 0.5
    out = capsys.readouterr().out
    assert f"### {micro_world.name}\n" in out and "| melo | 8 |" in out
    for metric in plots.METRICS:
        assert (results / f"lifelong-{metric}.png").stat().st_size > 0
    assert lifelong.main([*argv, "--resume"]) == 0
    assert "exit" not in capsys.readouterr().out
