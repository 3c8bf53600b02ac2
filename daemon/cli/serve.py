"""``editd serve`` and ``editd checkpoint``: run the daemon, manage its checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import click

from daemon.cli.app import EditdGroup, cli, config_option, echo_json, json_option, state
from daemon.cli.client import call


@cli.command()
@config_option
@click.option("--host", default=None, help="Override [api] host.")
@click.option("--port", type=int, default=None, help="Override [api] port (0: any free port).")
@click.option(
    "--port-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the bound port to this file once listening.",
)
@click.pass_context
def serve(ctx: click.Context, host: str | None, port: int | None, port_file: Path | None) -> None:
    """Run the daemon: worker, scheduler and HTTP API (until SIGTERM)."""
    from dataclasses import replace

    from daemon.api.server import ApiServer
    from daemon.config import load_config
    from daemon.log import adopt_transformers_logging, configure_logging
    from daemon.service.serve import run_server

    cfg = load_config(state(ctx).config_path)
    configure_logging(cfg.log.level, cfg.log.format)
    adopt_transformers_logging()  # its warnings as JSON lines too
    api = replace(
        cfg.api,
        host=cfg.api.host if host is None else host,
        port=cfg.api.port if port is None else port,
    )
    raise SystemExit(run_server(replace(cfg, api=api), frontend=ApiServer, port_file=port_file))


@cli.group(cls=EditdGroup)
def checkpoint() -> None:
    """List, create and restore checkpoints of the editors' state."""


@checkpoint.command(name="list")
@config_option
@json_option
@click.pass_context
def checkpoint_list(ctx: click.Context, as_json: bool) -> None:
    """List recorded checkpoints, newest first."""
    from store.checkpoints import list_checkpoints
    from store.db import Store

    with Store.open(state(ctx).config().store.path, create=False) as st:
        rows = [c.to_json_dict() for c in list_checkpoints(st)]
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no checkpoints yet")
    for row in rows:
        click.echo(f"{row['id']}  {row['status']:5}  edits={row['edit_count']}  {row['path']}")


@checkpoint.command(name="create")
@config_option
@json_option
@click.pass_context
def checkpoint_create(ctx: click.Context, as_json: bool) -> None:
    """Ask the running daemon to write a checkpoint now."""
    record = call(state(ctx).config(), "POST", "/v1/checkpoints")
    if as_json:
        echo_json(record)
    else:
        click.echo(f"{record['id']}  edits={record['edit_count']}  {record['path']}")


@checkpoint.command(name="restore")
@config_option
@click.argument("checkpoint_id")
@json_option
@click.pass_context
def checkpoint_restore(ctx: click.Context, checkpoint_id: str, as_json: bool) -> None:
    """Restore the running daemon's editors from a checkpoint and replay later edits."""
    report = call(state(ctx).config(), "POST", f"/v1/checkpoints/{checkpoint_id}/restore")
    if as_json:
        echo_json(report)
    else:
        click.echo(
            f"restored {checkpoint_id}: {report['from_checkpoint']} edits from the checkpoint, "
            f"{report['replayed']} replayed, {report['retracted']} retracted"
        )


@cli.command()
@config_option
@json_option
@click.pass_context
def probe(ctx: click.Context, as_json: bool) -> None:
    """Score the drift probe set: the running daemon's edited model against the base
    model (top-1 agreement, mean KL) plus the retention of applied edits. A failing
    check rolls the daemon back to its last good checkpoint and isolates the culprits."""
    report = call(state(ctx).config(), "POST", "/v1/drift")
    if as_json:
        echo_json(report)
        return
    verdict = "passed" if report["passed"] else "FAILED"
    click.echo(
        f"drift {verdict}: top-1 agreement {report['top1_agreement']:.4f}, "
        f"mean KL {report['mean_kl']:.6f}, retention {report['retention']} "
        f"({report['retention_sampled']} sampled) over {report['n']} probes"
    )
    for reason in report["reasons"]:
        click.echo(f"  - {reason}")
    if report.get("rollback"):
        click.echo(f"rolled back: {json.dumps(report['rollback'])}")
