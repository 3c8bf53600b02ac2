"""``bench.cost`` and ``bench.phases``: the three stages on the micro world, tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench import cost
from bench.phases import PhaseTimer, Probe, slope_per_1000, tensor_bytes
from daemon.world.editsets import counterfactual_edits, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def test_phase_times_are_exclusive_and_patches_are_undone() -> None:
    """A phase called inside another is not counted twice; the originals come back;
    a target that does not exist is reported, not fatal."""
    import bench.phases as module

    timer = PhaseTimer()
    original = module.slope_per_1000
    probes = [
        Probe("inner", "bench.phases:slope_per_1000"),
        Probe("gone", "bench.phases:no_such_function"),
        Probe("method", "bench.phases:PhaseTimer.snapshot"),
    ]
    with timer.patched(probes) as missing:
        assert module.slope_per_1000 is not original
        with timer.phase("outer"):
            for _ in range(50):
                module.slope_per_1000([0.0, 1.0, 2.0], [0.0, 2.0, 4.0])
            timer.snapshot()
    assert missing == ["bench.phases:no_such_function"]
    assert module.slope_per_1000 is original
    assert "snapshot" in vars(PhaseTimer) and not hasattr(PhaseTimer.snapshot, "__wrapped__")
    assert timer.calls == {"inner": 50, "method": 1, "outer": 1}
    assert all(v >= 0 for v in timer.seconds.values())
    assert slope_per_1000([0, 1, 2], [0, 2, 4]) == pytest.approx(2000.0)
    assert tensor_bytes({"a": [torch.zeros(3, dtype=torch.float64)], "b": "text"}) == 24


@pytest.fixture(scope="module")
def edits_file(micro_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = AutoModelForCausalLM.from_pretrained(micro_world)
    tok = AutoTokenizer.from_pretrained(micro_world)
    out = tmp_path_factory.mktemp("cost") / "edits.jsonl"
    return write_jsonl(out, counterfactual_edits(micro_world, model, tok, 12))


def run(tmp_path: Path, micro_world: Path, edits: Path, *extra: str) -> dict[str, Any]:
    argv = [
        "--model",
        str(micro_world),
        "--edits",
        str(edits),
        "--config",
        str(REPO / "config.toml"),
        "--stats-home",
        str(tmp_path / "home"),
        "--hook-layers",
        "0,1",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path / "out"),
        *extra,
    ]
    assert cost.main(argv) == 0
    (path,) = (tmp_path / "out").glob("cost-*.json")
    result: dict[str, Any] = json.loads(path.read_text())
    assert result["machine"]["torch_threads"] == 1 and result["command"]
    return result


def test_phases_stage_times_every_phase(
    micro_world: Path, edits_file: Path, tmp_path: Path
) -> None:
    """Each back-end's phases are found and timed (positive), and they sum to the total
    (medians over two rounds)."""
    result = run(
        tmp_path,
        micro_world,
        edits_file,
        *("--stage", "phases", "--backends", "hook,melo,ft", "--n", "4", "--warmup", "2"),
        *("--hook-batch-sizes", "2", "--melo-batch-sizes", "2", "--rounds", "2"),
    )
    runs = {(r["backend"], r["batch_size"]): r for r in result["runs"]}
    assert sorted(runs) == [("ft", 1), ("hook", 2), ("melo", 2)]
    expected = {
        "hook": {"keys", "targets", "solve", "solve_linalg", "gate", "recall_check", "verify"},
        "melo": {"checks", "keys", "training", "index_insert", "index_journal", "editor_verify"},
        "ft": {"training", "verify", "apply_other"},
    }
    for (name, _), r in runs.items():
        assert r["unpatched"] == []
        phases = r["phases_s_per_edit"]
        assert expected[name] <= set(phases), (name, phases)
        assert all(phases[p] > 0 for p in expected[name])
        assert r["phases_sum_s"] == pytest.approx(r["total_s"], rel=0.05, abs=0.01)
        assert sum(phases.values()) == pytest.approx(r["s_per_edit"], rel=0.05, abs=0.005)
        assert r["edits"] == 4 and r["accepted"] + r["refused"] + r["verify_failed"] == 4
        assert r["rounds"] == 2 and len(r["s_per_edit_rounds"]) == 2


def test_scale_stage_reports_sizes_and_slopes(
    micro_world: Path, edits_file: Path, tmp_path: Path
) -> None:
    """At each size: live edits, state and disk bytes that grow, save/load seconds."""
    result = run(
        tmp_path,
        micro_world,
        edits_file,
        *("--stage", "scale", "--backends", "hook,melo", "--sizes", "3,6", "--batch-size", "3"),
    )
    assert [r["backend"] for r in result["backends"]] == ["hook", "melo"]
    for r in result["backends"]:
        first, last = r["points"]
        assert (first["edits"], last["edits"]) == (3, 6)
        assert 0 < first["live"] <= last["live"] <= 6
        assert 0 < first["state_bytes"] <= last["state_bytes"]
        assert 0 < first["disk_bytes"] <= last["disk_bytes"]
        assert last["save_s"] > 0 and last["load_s"] > 0
        assert set(r["slopes_per_1000_edits"]) >= {"state_bytes", "disk_bytes", "save_s"}


def test_covariance_stage_times_budgets_and_the_cache(
    micro_world: Path, edits_file: Path, tmp_path: Path
) -> None:
    """Each budget's token count and seconds; the second cached call reuses the file."""
    result = run(tmp_path, micro_world, edits_file, "--stage", "covariance", "--budgets", "200,800")
    assert [r["budget"] for r in result["budgets"]] == [200, 800]
    assert [r["tokens"] for r in result["budgets"]] == [200, 800]
    assert all(r["seconds"] > 0 for r in result["budgets"])
    cache = result["cache"]
    assert cache["artefact_mb"] > 0 and cache["reuse_s"] < cache["first_call_s"]
