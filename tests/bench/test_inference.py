"""``bench.inference``: the list of sizes on the micro world (MELO; the benchmark's hook
layout, layers 2-3, needs the small world's four layers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench import inference
from daemon.world.editsets import counterfactual_edits, write_jsonl


def test_sizes_time_each_size_against_the_base_model(
    micro_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Sizes 0, 3 and 6 grow one stream; each has generation, fixed-step and forward
    ratios and the index search time; a size past the edit file is skipped, yet the
    synthetic index is still timed at it."""
    model = AutoModelForCausalLM.from_pretrained(micro_world)
    tok = AutoTokenizer.from_pretrained(micro_world)
    edits = write_jsonl(tmp_path / "edits.jsonl", counterfactual_edits(micro_world, model, tok, 6))
    out = tmp_path / "results"
    argv = [
        *("--model", str(micro_world), "--edits", str(edits), "--editor", "melo"),
        *("--sizes", "0,3,6,50", "--batch-size", "3", "--prompts", "12", "--rounds", "1"),
        *("--reps", "2", "--gate-edits", "6", "--stats-home", str(tmp_path), "--out", str(out)),
    ]
    assert inference.main(argv) == 0
    result = json.loads((out / f"inference-melo-0_3_6_50-{micro_world.name}.json").read_text())
    by_size = {s["edits"]: s for s in result["by_size"]}
    assert sorted(by_size) == [0, 3, 6, 50] and "skipped" in by_size[50]
    for size in (0, 3, 6):
        row = by_size[size]
        facts = row["editor_facts"]
        assert facts["edits"] == size  # every edit accepted
        assert facts["index_keys"] >= size  # subject keys: the prompt's and the frames'
        assert row["routing_cost"].get("keys", 0) == facts["index_keys"]
        for what in ("generation", "generation_fixed_steps", "forward"):
            assert row[what]["ratio"] > 0
        assert row["generation_fixed_steps"]["tokens_per_s_base"] > 0
    assert by_size[0]["routing_cost"] == {"keys": 0}
    assert by_size[6]["routing_cost"]["us_per_query_batched"] > 0
    synthetic = {row["size"]: row for row in result["index_search_synthetic"]}
    assert synthetic[50]["keys"] == 50 and synthetic[50]["us_single_query"] > 0
    assert result["routing_quality"]["edits_checked"] == 6
    assert "| melo | 6 |" in capsys.readouterr().out


def test_a_real_model_gets_benchmark_edits_common_probes_and_its_own_editor_settings(
    micro_world: Path, shared_dir: Path, tmp_path: Path
) -> None:
    """A folder without ``world.json``: CounterFact converted as ``editd eval`` does, the
    shipped common-facts probes, and the config's hook settings (not the world's)."""
    real = tmp_path / "real"
    real.mkdir()
    records = inference.edit_records(
        shared_dir / "data/counterfact/counterfact-edit.json", "counterfact", 5
    )
    assert len(records) == 5 and records[0]["id"] == "counterfact-0"
    assert records[0]["subject"] in records[0]["prompt"] and records[0]["locality"]
    probes = inference.probe_prompts_for(real)
    assert len(probes) > 100 and len(set(probes)) == len(probes)
    assert inference.probe_prompts_for(micro_world) != probes
    config = tmp_path / "editd.toml"
    config.write_text('[editors.hook]\nlayers = [5]\nkey_position = "subject_last"\n')
    cfg = inference.editor_config(config, tmp_path, world=False)
    assert cfg.editors.hook.layers == (5,) and cfg.editors.hook.key_position == "subject_last"
    world = inference.editor_config(config, tmp_path, world=True)
    assert world.editors.hook.layers == (2, 3) and world.editors.hook.key_position == "prompt_last"
    assert cfg.store.path == tmp_path / "editd.sqlite3"
