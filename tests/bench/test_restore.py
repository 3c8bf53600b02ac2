"""``bench.restore``: the three restarts on a tiny store of the micro world."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from bench import restore
from daemon.world.editsets import counterfactual_edits, write_jsonl


def test_restore_benchmark_measures_three_restarts(micro_world: Path, tmp_path: Path) -> None:
    """From the full checkpoint nothing is replayed; without checkpoints every edit is;
    from the 90% checkpoint the last 10% are. The JSON carries all three rows."""
    model = AutoModelForCausalLM.from_pretrained(micro_world)
    tok = AutoTokenizer.from_pretrained(micro_world)
    edits = write_jsonl(tmp_path / "edits.jsonl", counterfactual_edits(micro_world, model, tok, 20))
    out = tmp_path / "results"
    argv = ["--model", str(micro_world), "--edits", str(edits), "--n", "20", "--repeat", "1"]
    assert restore.main([*argv, "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads((out / f"restore-{micro_world.name}-20.json").read_text())
    runs = result["restarts"]
    assert result["build"]["edits"]["applied"] == 20
    assert (runs["checkpoint_all"]["from_checkpoint"], runs["checkpoint_all"]["replayed"]) == (
        20,
        0,
    )
    assert (runs["full_replay"]["from_checkpoint"], runs["full_replay"]["replayed"]) == (0, 20)
    tail = runs["checkpoint_90_replay_10"]
    assert (tail["from_checkpoint"], tail["replayed"]) == (18, 2)
    assert all(r["restore_s"] <= r["start_s"] for r in runs.values())
    build = result["build"]
    assert len(build["extra_writes_s"]) == 2 and build["write_s_median"] > 0


def test_restore_benchmark_can_skip_the_full_replay(micro_world: Path, tmp_path: Path) -> None:
    """``--skip-full-replay`` leaves restart (b) out; (a) and (c) still run. Edits past
    the file's come from the world's probe split."""
    model = AutoModelForCausalLM.from_pretrained(micro_world)
    tok = AutoTokenizer.from_pretrained(micro_world)
    edits = write_jsonl(tmp_path / "edits.jsonl", counterfactual_edits(micro_world, model, tok, 6))
    out = tmp_path / "results"
    argv = ["--model", str(micro_world), "--edits", str(edits), "--n", "10", "--repeat", "1"]
    argv += ["--write-repeat", "0", "--skip-full-replay"]
    assert restore.main([*argv, "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads((out / f"restore-{micro_world.name}-10.json").read_text())
    assert set(result["restarts"]) == {"checkpoint_all", "checkpoint_90_replay_10"}
    assert result["build"]["edits"]["applied"] == 10
    assert (tmp_path / "edits+probe4.jsonl").is_file()
