"""The hook's subject-gate floor: paraphrase against locality for fixed floors and ``auto``.

For each model and each floor (numbers, or ``auto`` for the floor calibrated from the
fact world), one ``editd eval`` of the hook over the world's edits with
``bench/hook.toml``'s settings and ``gate_subject_cos_floor`` set to that floor. Prints
one table per model and writes ``<results>/floor-<model>.json`` (the last checkpoint
of each run, the floor ``auto`` picked, the commands).

    .venv/bin/python -m bench.floor --models small-gpt2,small-llama \
        --floors 0.55,0.60,0.65,0.70,auto
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.lifelong import REPO, _env, world_edit_file

HOOK_TOML = REPO / "bench" / "hook.toml"
COLUMNS = ("efficacy", "paraphrase", "heldout", "locality", "retention", "refused")


def floor_config(base: str, floor: str, var: Path) -> str:
    """``base`` (bench/hook.toml's text) with its ``../var`` paths pointing at ``var`` and
    ``gate_subject_cos_floor`` set to ``floor`` in ``[editors.hook]``."""
    if "[editors.hook]" not in base:
        raise ValueError("the base config has no [editors.hook] table")
    text = base.replace('"../var', f'"{var.as_posix()}')
    value = '"auto"' if floor == "auto" else str(float(floor))
    line = f"gate_subject_cos_floor = {value}\n"
    head, _, tail = text.partition("[editors.hook]")
    # the key goes first in the table, so keys that follow it keep their table
    return f"{head}[editors.hook]\n{line}{tail.lstrip(chr(10))}"


def parse_floors(value: str) -> list[str]:
    """``"0.55,auto"`` -> ``["0.55", "auto"]``; each a number in [-1, 1] or ``auto``."""
    floors = [v.strip() for v in value.split(",") if v.strip()]
    for f in floors:
        if f != "auto" and not -1.0 <= float(f) <= 1.0:
            raise argparse.ArgumentTypeError(f"floor {f} is not in [-1, 1]")
    if not floors:
        raise argparse.ArgumentTypeError("no floors given")
    return floors


def calibrated_floor(log_text: str) -> float | None:
    """The floor of the last ``hook_floor_calibrated`` event in an eval log (JSON lines
    or console lines), if any."""
    floor = None
    for line in log_text.splitlines():
        if "hook_floor_calibrated" not in line:
            continue
        try:
            floor = float(json.loads(line)["floor"])
        except (ValueError, KeyError, TypeError):
            found = re.search(r"\bfloor=([0-9.]+)", line)
            floor = float(found.group(1)) if found else floor
    return floor


def run_one(model_dir: Path, edits: Path, n: int, floor: str, out: Path) -> dict[str, Any]:
    """One eval at ``floor``; its last checkpoint, the floor used and the command."""
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.toml"
    config.write_text(
        floor_config(HOOK_TOML.read_text(encoding="utf-8"), floor, REPO / "var"), "utf-8"
    )
    command = [sys.executable, "-m", "daemon.cli", "-v", "--config", str(config), "eval"]
    command += ["--model", str(model_dir), "--editor", "hook", "--edits", str(edits)]
    command += ["--format", "editd", "--n", str(n), "--checkpoints", str(n)]
    command += ["--batch-size", "10", "--out", str(out), "--quiet"]
    t0 = time.perf_counter()
    with (out / "eval.log").open("w", encoding="utf-8") as log:
        done = subprocess.run(command, env=_env(), stdout=log, stderr=log, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"eval at floor {floor} failed: see {out / 'eval.log'}")
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    last = report["checkpoints"][-1]
    used = calibrated_floor((out / "eval.log").read_text(encoding="utf-8"))
    return {
        "floor": floor,
        "floor_used": used if floor == "auto" else float(floor),
        "edits": last["edits"],
        **{k: last[k] for k in COLUMNS},
        "wall_s": round(time.perf_counter() - t0, 1),
        "command": command,
    }


def table(model: str, rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"### {model}", "", "| floor | used | edits | " + " | ".join(COLUMNS) + " |"]
    lines.append("|" + "---|" * (3 + len(COLUMNS)))
    for r in rows:
        used = "-" if r["floor_used"] is None else f"{r['floor_used']:.2f}"
        cells = [f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in COLUMNS]
        lines.append(f"| {r['floor']} | {used} | {r['edits']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--models", default="small-gpt2,small-llama")
    parser.add_argument("--floors", type=parse_floors, default=parse_floors("0.55,0.6,auto"))
    parser.add_argument("--n", type=int, default=1100, help="edits (capped at the world's)")
    parser.add_argument("--worlds", type=Path, default=REPO / "var" / "worlds")
    parser.add_argument("--edits-dir", type=Path, default=REPO / "var" / "evals" / "lifelong")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        model_dir = args.worlds / model
        args.edits_dir.mkdir(parents=True, exist_ok=True)
        edits, size = world_edit_file(model_dir, model, args.n, args.edits_dir)
        n = min(args.n, size)
        rows = []
        for floor in args.floors:
            out = args.results / "floor" / model / f"floor-{floor}"
            rows.append(run_one(model_dir, edits, n, floor, out))
            print(f"[{model}] floor {floor}: {json.dumps(rows[-1])[:200]}", flush=True)
        path = args.results / f"floor-{model}.json"
        result = {"benchmark": "floor", "model": model, "edits_file": str(edits), "runs": rows}
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(table(model, rows), flush=True)
        print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
