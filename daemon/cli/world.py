"""``editd world build|edits``: the synthetic fact world."""

from __future__ import annotations

from pathlib import Path

import click

from daemon.cli.app import CliError, EditdGroup, cli, config_option, echo_json, json_option, state
from daemon.model.source import apply_threads
from daemon.world.facts import WORLD_SPECS


@cli.group(cls=EditdGroup)
def world() -> None:
    """Build the synthetic fact-world model and draw edit sets from it."""


@world.command(name="build")
@config_option
@json_option
@click.option("--size", type=click.Choice(sorted(WORLD_SPECS)), default="micro", show_default=True)
@click.option("--arch", type=click.Choice(["llama", "gpt2"]), default="llama", show_default=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder (default: <world_cache>/<size>-<arch>-seed<seed>).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option(
    "--min-accuracy",
    type=click.FloatRange(0, 1),
    help="Training-template accuracy below which the model is not ready (0.95).",
)
@click.option(
    "--gpt2-tokenizer",
    type=click.Path(file_okay=False, path_type=Path),
    help="Use the real GPT-2 vocabulary in this folder instead of a trained BPE.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def world_build(
    ctx: click.Context,
    as_json: bool,
    size: str,
    arch: str,
    out: Path | None,
    seed: int,
    force: bool,
    min_accuracy: float | None,
    gpt2_tokenizer: Path | None,
    quiet: bool,
) -> None:
    """Generate a fact world, train a model until it knows the facts, save it.

    An existing output folder (even an empty one) is replaced only with --force.
    """
    from daemon.world.build import build_world

    cfg = state(ctx).config()
    folder = out or cfg.model.world_cache / f"{size}-{arch}-seed{seed}"
    if (folder.exists() or folder.is_symlink()) and not force:
        # as `editd model import`: refused before minutes of training, not after
        raise CliError(f"'{folder}' already exists (pass --force to replace it)")
    apply_threads(cfg.model.threads)
    report = build_world(
        folder,
        size=size,
        arch=arch,
        seed=seed,
        force=force,
        threads=max(1, cfg.model.threads),
        progress=not quiet,
        min_accuracy=min_accuracy,
        tokenizer_dir=gpt2_tokenizer,
    )
    if as_json:
        echo_json(report.to_json())
        return
    click.echo(f"built {report.size} {report.arch} world in {report.path}")
    click.echo(f"  facts: {report.n_facts}   parameters: {report.n_parameters:,}")
    click.echo(f"  greedy exact match, training templates: {report.train_accuracy:.3f}")
    click.echo(f"  greedy exact match, held-out templates: {report.heldout_accuracy:.3f}")
    click.echo(
        f"  steps: {report.steps}   train time: {report.train_seconds:.1f} s   "
        f"total: {report.seconds:.1f} s   ready: {report.ready}"
    )


@world.command(name="edits")
@config_option
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)
@click.option("--n", type=click.IntRange(min=1), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--split",
    default="edit",
    show_default=True,
    help="The world's split(s) the facts come from, comma-separated and used in order "
    "(edit,probe: the probe split only past the edit split's qualifying facts).",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.pass_context
def world_edits(
    ctx: click.Context, model_dir: Path, n: int, seed: int, split: str, out: Path
) -> None:
    """Write N counterfactual edit requests (JSONL) drawn from a built world."""
    from daemon.model.loading import load_model
    from daemon.world.editsets import counterfactual_edits, write_jsonl

    cfg = state(ctx).config()
    apply_threads(cfg.model.threads)
    loaded = load_model(str(model_dir), device=cfg.model.device, dtype=cfg.model.dtype)
    splits = tuple(part.strip() for part in split.split(",") if part.strip())
    records = counterfactual_edits(
        model_dir, loaded.model, loaded.tokenizer, n, seed=seed, split=splits
    )
    write_jsonl(out, records)
    click.echo(f"wrote {len(records)} edits to {out}")
