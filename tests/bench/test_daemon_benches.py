"""``bench.throughput``, ``bench.load``, ``bench.soak``: their helpers, and smoke runs of
each against a real ``editd serve`` on the micro world (tiny parameters)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench import load, soak, throughput
from bench.daemon_process import histogram, histogram_delta, hook_layers
from bench.stats import percentile, summary
from daemon.service.metrics import DaemonMetrics
from daemon.world.editsets import counterfactual_edits, write_jsonl
from store import editlog
from store.db import Store
from store.editlog import EventKind
from store.queue import EditQueue
from store.schema import EditStatus


@pytest.fixture(scope="module")
def micro_edits(micro_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 counterfactual edits of the micro world as JSONL (with client ids)."""
    model = AutoModelForCausalLM.from_pretrained(micro_world)
    tok = AutoTokenizer.from_pretrained(micro_world)
    path = tmp_path_factory.mktemp("bench-edits") / "edits.jsonl"
    return write_jsonl(path, counterfactual_edits(micro_world, model, tok, 40))


# --- helpers ---------------------------------------------------------------------------


def test_percentile_interpolates_and_summary_handles_empty() -> None:
    """Percentiles interpolate linearly between order statistics; empty input gives None."""
    assert percentile([4.0, 1.0, 3.0, 2.0, 5.0], 50) == 3.0
    assert percentile([1.0, 2.0], 95) == pytest.approx(1.95)
    assert percentile([], 50) is None
    assert summary([])["p50"] is None and summary([])["n"] == 0
    assert summary([1.0, 2.0, 3.0])["max"] == 3.0


def test_histogram_reads_the_daemon_metric_and_subtracts_an_earlier_scrape() -> None:
    """The submit-to-applied histogram is read from the daemon's own exposition."""
    metrics = DaemonMetrics("test")
    metrics.observe_submit_to_applied(0.3)
    before = histogram(metrics.exposition()[0].decode(), throughput.METRIC)
    for s in (0.3, 0.7, 20.0):
        metrics.observe_submit_to_applied(s)
    after = histogram(metrics.exposition()[0].decode(), throughput.METRIC)
    assert before is not None and after is not None
    assert (before["count"], after["count"]) == (1, 4)
    delta = histogram_delta(before, after)
    assert delta is not None
    assert delta["count"] == 3 and delta["sum_s"] == pytest.approx(21.0)
    assert delta["p50_le_s"] == 1.0 and delta["p95_le_s"] == 30.0
    json.dumps(delta, allow_nan=False)  # no +Inf bucket in the JSON
    assert histogram("nothing here", throughput.METRIC) is None


def test_memory_report_separates_edit_state_from_other_growth() -> None:
    """The RSS slope per applied edit is a least-squares fit; the expected growth is
    the applied edits times the edit state per edit."""
    series = [[float(t), 500.0 + 0.02 * t, 100 + t] for t in range(50)]
    series[0][1] += 40.0  # a warm-up jump before the steady part
    report = load.memory_report(series, state_kb_per_edit=20.48, settle_s=10.0)
    steady = report["steady"]
    assert steady["slope_kb_per_applied_edit"] == pytest.approx(20.5, abs=0.1)
    assert steady["applied_in_window"] == 35 and report["applied_in_window"] == 45
    assert steady["growth_beyond_edit_state_mb"] == pytest.approx(0.0, abs=0.01)
    assert report["max_mb"] == 540.0
    assert load.slope([1.0, 1.0], [2.0, 3.0]) is None


def test_hook_layers_fit_the_model(tmp_path: Path) -> None:
    """A 2-layer model (the micro world) gets its last layer; four or more layers get 2-3."""
    for layers, expected in ((2, [1]), (4, [2, 3]), (12, [2, 3])):
        (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
        assert hook_layers(tmp_path) == expected


def test_store_check_counts_lost_doubled_and_regressed(tmp_path: Path) -> None:
    """The soak's store invariants are not vacuous: each violation is seen."""
    path = tmp_path / "editd.sqlite3"
    edits = [{"id": f"e{i}", "prompt": f"Fact {i} is", "target": " x"} for i in range(3)]
    with Store.open(path) as store:
        queue = EditQueue(store)
        queue.submit_many(edits)
        for record in queue.claim(3, 60.0, "w"):
            queue.ack(record.id, "w", backend="melo")
    state = soak.Soak(edits)
    state.submitted = {e["id"]: e for e in edits}
    clean = soak.store_check(path, state)
    assert clean["lost"] == [] and clean["doubled_apply"] == [] and clean["regressed"] == []
    assert clean["applied_ids"] == ["e0", "e1", "e2"] and state.ever_applied == {"e0", "e1", "e2"}
    with Store.open(path) as store:
        editlog.append(store, EventKind.EDIT_APPLIED, edit_id="e1")
        EditQueue(store).transition("e2", EditStatus.RETRACTED, reason="test")
    state.submitted["ghost"] = {"id": "ghost", "prompt": "p", "target": " t"}
    found = soak.store_check(path, state)
    assert found["lost"] == ["ghost"]
    assert found["doubled_apply"] == ["e1"]
    assert found["regressed"] == ["e2"]
    assert found["statuses"] == {"applied": 2, "retracted": 1, "missing": 1}


# --- smoke runs against editd serve -----------------------------------------------------


def _run(module: Any, argv: list[str], out: Path, name: str) -> dict[str, Any]:
    assert module.main([*argv, "--out", str(out)]) == 0
    return dict(json.loads((out / name).read_text()))


@pytest.mark.slow
def test_throughput_smoke(micro_world: Path, micro_edits: Path, tmp_path: Path) -> None:
    """8 edits at batch sizes 1 and 4: all applied and verified, latencies recorded."""
    argv = ["--model", str(micro_world), "--edits", str(micro_edits), "--n", "8"]
    argv += ["--batch-sizes", "1,4", "--work", str(tmp_path / "work")]
    result = _run(throughput, argv, tmp_path, f"throughput-{micro_world.name}-8-melo.json")
    assert [r["batch_size"] for r in result["runs"]] == [1, 4]
    for run in result["runs"]:
        assert run["applied"] == run["verified"] == 8 and run["failed"] == 0
        assert run["edits_per_s"] > 0 and run["latency_s"]["n"] == 8
        assert run["latency_s"]["p50"] <= run["latency_s"]["max"]
        assert run["daemon_histogram"]["count"] == 8
    assert {"platform", "cpu_count", "torch", "date"} <= set(result["machine"])


@pytest.mark.slow
def test_load_smoke(micro_world: Path, micro_edits: Path, tmp_path: Path) -> None:
    """8 s with 2 completion clients and an edit stream over 5 preloaded edits: no errors,
    completions served, streamed edits applied, an RSS sample every second."""
    argv = ["--model", str(micro_world), "--edits", str(micro_edits), "--backends", "melo"]
    argv += ["--duration-s", "8", "--clients", "2", "--preload", "5", "--edit-rate", "0.5"]
    argv += ["--work", str(tmp_path / "w")]
    result = _run(load, argv, tmp_path, f"load-{micro_world.name}-melo.json")
    run = result["run"]
    assert run["errors"] == 0 and run["error_samples"] == []
    assert run["completions"]["requests"] > 0 and run["completions"]["tokens_per_s"] > 0
    assert run["edits"]["submitted"] >= 3 and run["edits"]["applied"] == run["edits"]["submitted"]
    assert len(run["memory"]["series"]) >= 6 and run["memory"]["start_mb"] > 0
    assert run["edit_state"]["applied_edits"] == 5 + run["edits"]["applied"]
    assert run["exit_code"] == 0


@pytest.mark.slow
def test_soak_smoke(micro_world: Path, micro_edits: Path, tmp_path: Path) -> None:
    """Two kill -9 / restart cycles under load: nothing lost, doubled or inconsistent."""
    argv = ["--model", str(micro_world), "--edits", str(micro_edits), "--n-edits", "40"]
    argv += ["--cycles", "2", "--min-run-s", "2", "--max-run-s", "4", "--every-edits", "3"]
    argv += ["--work", str(tmp_path / "w")]
    result = _run(soak, argv, tmp_path, f"soak-{micro_world.name}-melo.json")
    run = result["run"]
    assert [r["cycle"] for r in run["cycles"]] == [1, 2, "drained"]
    assert all(v == 0 for k, v in run["totals"].items() if k in soak.VIOLATIONS)
    assert run["totals"]["errors"] == 0 and run["totals"]["submitted"] > 0
    assert run["totals"]["applied_at_end"] == run["totals"]["submitted"]
    assert run["restart_s"]["n"] == 2 and run["exit_code"] == 0


def test_soak_stream_resubmits_what_a_kill_cut_off() -> None:
    """An edit whose POST got no answer is taken again before new ones."""
    pool = [{"id": str(i)} for i in range(3)]
    state = soak.Soak(pool)
    first = state.take()
    assert first is not None
    state.pending.append(first)
    assert state.take() == first and state.take() == pool[1]
