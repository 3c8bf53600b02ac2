"""``editd demo``: load the configured model and show what it knows and where things stand.

With the defaults this builds (once, cached) and loads the embedded fact-world
model, asks it a handful of its facts, and prints the store's status. It grows
into the full edit/retract walk-through as the daemon is built.
"""

from __future__ import annotations

import random

import click

from daemon.cli.app import cli, config_option, state
from daemon.cli.edits import status_report
from daemon.model import arch
from daemon.model.generate import greedy_continuations
from daemon.model.loading import LoadedModel
from daemon.model.source import load_configured_model
from store.db import Store

N_QUESTIONS = 6


def _world_questions(loaded: LoadedModel) -> list[tuple[str, str]]:
    from pathlib import Path

    from daemon.eval.basetask import world_base_task

    pairs = world_base_task(Path(loaded.name_or_path), n=200) or []
    return random.Random(0).sample(pairs, min(N_QUESTIONS, len(pairs)))


def _describe_model(loaded: LoadedModel) -> None:
    model = loaded.model
    params = sum(p.numel() for p in model.parameters())
    click.echo(f"model:   {loaded.name_or_path}")
    click.echo(
        f"         {loaded.arch.model_type}, {arch.num_layers(model)} layers, hidden "
        f"{arch.hidden_size(model)}, {params:,} parameters, {loaded.dtype} on "
        f"{loaded.device}, loaded in {loaded.load_seconds:.2f} s"
    )
    click.echo(
        f"         hook layers (default) {arch.default_hook_layers(model)}, MELO layers "
        f"(default) {arch.default_melo_layers(model)}"
    )


@cli.command()
@config_option
@click.pass_context
def demo(ctx: click.Context) -> None:
    """Load the configured model (building the fact world on first use) and show its state."""
    cfg = state(ctx).config()
    click.echo("loading the configured model (the first run builds the fact world: a few minutes)")
    loaded = load_configured_model(cfg.model)
    _describe_model(loaded)
    questions = _world_questions(loaded)
    if questions:
        answers = greedy_continuations(
            loaded.model, loaded.tokenizer, [q for q, _ in questions], max_new_tokens=6
        )
        click.echo("\nwhat the model knows (greedy answers; facts no edit has touched):")
        for (prompt, truth), answer in zip(questions, answers, strict=True):
            mark = "ok " if answer.lstrip().startswith(truth.strip()) else "   "
            click.echo(f"  {mark}{prompt + answer:<64} (true:{truth})")
    with Store.open(cfg.store.path, create=True) as st:
        report = status_report(st)
    counts = "  ".join(f"{k}={v}" for k, v in report["edits"].items() if v)
    click.echo(f"\nstore:   {report['store']} (schema v{report['schema_version']})")
    click.echo(f"queue:   depth {report['queue_depth']}   {counts or 'no edits yet'}")
    click.echo(
        "\nnext:    editd submit FILE to queue edits; the daemon that applies them is being built."
    )
