"""``editd locate``: find where the model recalls facts, for the COMEBA-HK hook back-end.

Results are cached per model under ``<folder of [store] path>/locate/`` (by default
``var/locate/``), beside the store, so a daemon configured with the same file finds
them; see ``daemon.editors.hook.locate`` for the method and the choice rule.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import click

from daemon.cli.app import cli, config_option, echo_json, json_option, state
from daemon.errors import LocateError

if TYPE_CHECKING:
    from daemon.config import Config
    from daemon.editors.hook.locate import LocateResult
    from daemon.editors.hook.patching import TraceFact

CANDIDATES_PER_PAIR = 4
"""World facts offered per wanted pair: enough that unrecalled facts do not starve pairing."""


def _facts(model_dir: str, facts_path: Path | None, n: int) -> list[TraceFact]:
    """Facts from ``--facts``, else from the ``world.json`` beside a fact-world model."""
    from daemon.editors.hook.locate import request_trace_facts, world_trace_facts
    from daemon.world.build import WORLD_FILE, load_world

    if facts_path is not None:
        facts, skipped = request_trace_facts(facts_path)
        for line in skipped[:20]:
            click.echo(f"skipped: {line}", err=True)
        if len(skipped) > 20:
            click.echo(f"... and {len(skipped) - 20} more skipped record(s)", err=True)
        return facts
    folder = Path(model_dir)
    if not (folder / WORLD_FILE).is_file():
        raise LocateError(
            f"no facts to trace: {folder} has no {WORLD_FILE} (not a fact-world model); "
            "pass --facts FILE with edit requests (prompt and subject)",
            path=str(folder),
        )
    return world_trace_facts(load_world(folder), limit=CANDIDATES_PER_PAIR * n)


def _table(result: LocateResult) -> list[str]:
    """Layers by (site, kind): moved fractions, then the choice."""
    from daemon.editors.hook.patching import KINDS, SITES

    ev = result.evidence
    cols = [(s, k) for s in SITES for k in KINDS]
    lines = [
        f"model: {result.model_id}",
        f"{ev.n_layers} layers; {ev.n_pairs} prompt pairs over {ev.n_templates} templates "
        f"({ev.n_recalled} of {ev.n_facts} facts recalled)",
        "moved: fraction of pairs whose answer became the other prompt's answer when one "
        "hidden state was patched",
        "",
        f"{'layer':>5}  " + "  ".join(f"{s + ':' + k:>22}" for s, k in cols),
    ]
    for layer in range(ev.n_layers):
        cells = [f"{ev.scores[s][k].moved[layer]:>22.3f}" for s, k in cols]
        mark = " *" if layer in result.layers else ""
        lines.append(f"{layer:>5}  " + "  ".join(cells) + mark)
    lines += [
        "",
        f"key_position = {result.key_position}",
        f"layers = {list(result.layers)}  (window {result.window}; * in the table)",
        f"evidence computed in {result.seconds:.1f} s",
    ]
    return lines


def _overrides(cfg: Config) -> list[str]:
    hook = cfg.editors.hook
    out = []
    if hook.layers:
        out.append(f"note: [editors.hook] layers = {list(hook.layers)} overrides this choice")
    if hook.key_position != "auto":
        out.append(f"note: [editors.hook] key_position = '{hook.key_position}' overrides it")
    return out


@cli.command(name="locate")
@config_option
@json_option
@click.option("--model", help="Model folder or world:SIZE (default: [model] name_or_path).")
@click.option(
    "--facts",
    "facts_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSONL edit requests with prompt and subject (default: the fact world's facts).",
)
@click.option(
    "--n", type=click.IntRange(min=1), default=64, show_default=True, help="Prompt pairs."
)
@click.option("--window", type=click.IntRange(min=1), help="Hook layers (default: max(1, L/4)).")
@click.option("--force", is_flag=True, help="Recompute even when a cached result exists.")
@click.pass_context
def locate_(
    ctx: click.Context,
    as_json: bool,
    model: str | None,
    facts_path: Path | None,
    n: int,
    window: int | None,
    force: bool,
) -> None:
    """Find where the model recalls facts (layers, key position) for the hook back-end.

    Pairs prompts of the same template, patches one hidden state of one prompt
    with the other's (per layer, at the subject's last token and at the prompt's
    last token) and counts how often the answer follows. The result is cached
    under the store's folder (locate/) and reused by later runs.
    """
    from daemon.config import cache_dir
    from daemon.editors.hook.locate import cached_locate, locate_cache_dir
    from daemon.model.loading import load_model
    from daemon.model.source import apply_threads, resolve_model_source

    cfg = state(ctx).config()
    model_cfg = cfg.model if model is None else dataclasses.replace(cfg.model, name_or_path=model)
    apply_threads(model_cfg.threads)
    source = resolve_model_source(model_cfg, progress=not as_json)
    facts = _facts(source, facts_path, n)
    loaded = load_model(
        source,
        device=model_cfg.device,
        dtype=model_cfg.dtype,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    result = cached_locate(
        locate_cache_dir(cache_dir(cfg)),
        loaded,
        facts,
        window=window,
        max_pairs=n,
        force=force,
    )
    if as_json:
        echo_json(result.to_json())
        return
    for line in [*_table(result), *_overrides(cfg)]:
        click.echo(line)
