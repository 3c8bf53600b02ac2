"""Verbs that talk to the store directly: ``submit``, ``status``, ``edits``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from daemon.cli.app import CliError, EditdGroup, cli, config_option, echo_json, json_option, state
from daemon.config import Config, request_limits
from daemon.errors import EditdError, InvalidTransitionError, StoreInUseError
from daemon.service.instance_lock import StoreLock
from store.checkpoints import latest_good
from store.db import Store
from store.edits import EditRecord
from store.probes import latest_probe_run
from store.queue import EditQueue, EnqueueResult
from store.records import EditKind, EditStatus, SourceKind


def split_submission(data: bytes) -> list[object]:
    """One JSON object, a JSON array of objects, or JSON Lines → the raw items to submit.

    Whatever cannot be parsed is passed on as raw bytes so the store records it as
    rejected with its reason (never dropped).
    """
    try:
        whole = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        whole = None
    if isinstance(whole, dict):
        return [whole]
    if isinstance(whole, list):
        return list(whole)
    return [line for line in data.splitlines() if line.strip()]


def retract_in_store(st: Store, edit_id: str, reason: str) -> EditRecord:
    """Record a retraction in the store alone (no daemon runs: its next start applies it)."""
    queue = EditQueue(st)
    current = queue.get(edit_id).status
    if current is EditStatus.APPLYING:
        raise InvalidTransitionError(edit_id, current.value, EditStatus.RETRACTED.value)
    return queue.transition(edit_id, EditStatus.RETRACTED, reason=reason)


def claim_store_offline(
    store_path: Path, *, role: str, unreachable: EditdError, refusing: str
) -> StoreLock:
    """The store's lock for a CLI fallback that writes the store where a daemon would
    (no daemon answered: ``unreachable`` says where it was asked).

    Taken without waiting; held by the caller for the length of its write (``with``),
    so a daemon that starts meanwhile exits at once naming this process. When another
    process holds it (a daemon that runs but does not answer: another address, still
    binding; or another such fallback) nothing is written: a ``CliError`` (exit 1) names
    the holder's pid, with ``refusing`` (``"retracting ..."``) saying what was not done.
    """
    try:
        return StoreLock.acquire(store_path, role=role)
    except StoreInUseError as exc:
        raise CliError(
            f"{unreachable}, but {exc}: not {refusing}; retry once it answers (check [api] "
            "host and port), or stop it first"
        ) from exc


def _open(cfg: Config, *, create: bool) -> Store:
    return Store.open(cfg.store.path, create=create)


def _echo_result(number: int, result: EnqueueResult) -> None:
    if result.status == EditStatus.REJECTED.value:
        click.echo(f"item {number}: rejected: {result.reason} (stored as {result.id})", err=True)
    else:
        note = "" if result.created else " (already submitted)"
        click.echo(f"item {number}: {result.status} {result.id}{note}")


@cli.command()
@config_option
@json_option
@click.argument("source", type=click.File("rb"))
@click.pass_context
def submit(ctx: click.Context, source: Any, as_json: bool) -> None:
    """Queue edit requests from FILE (JSON Lines, a JSON array or one object; '-' for stdin).

    Invalid requests are stored as rejected with their reason; the exit status is 1
    when any was rejected.
    """
    cfg = state(ctx).config()
    items = split_submission(source.read())
    if not items:
        raise CliError("no edit requests in the input")
    with _open(cfg, create=True) as st:
        results = EditQueue(st).submit_many(
            items, limits=request_limits(cfg), source_kind=SourceKind.CLI
        )
    rejected = sum(r.status == EditStatus.REJECTED.value for r in results)
    if as_json:
        echo_json([r.to_json_dict() for r in results])
    else:
        for number, result in enumerate(results, start=1):
            _echo_result(number, result)
        click.echo(f"{len(results) - rejected} accepted, {rejected} rejected")
    if rejected:
        sys.exit(1)


def status_report(st: Store) -> dict[str, Any]:
    """Queue depth, edits by state, the last good checkpoint and the last probe run."""
    queue = EditQueue(st)
    checkpoint = latest_good(st)
    probe = latest_probe_run(st)
    return {
        "store": str(st.path),
        "schema_version": st.schema_version(),
        "queue_depth": queue.depth(),
        "edits": queue.counts(),
        "last_checkpoint": checkpoint.to_json_dict() if checkpoint else None,
        "last_probe_run": probe.to_json_dict() if probe else None,
    }


@cli.command()
@config_option
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Queue depth, edits by state, last checkpoint and last drift run (from the store)."""
    cfg = state(ctx).config()
    with _open(cfg, create=False) as st:
        report = status_report(st)
    if as_json:
        echo_json(report)
        return
    click.echo(f"store:        {report['store']} (schema v{report['schema_version']})")
    click.echo(f"queue depth:  {report['queue_depth']}")
    counts = "  ".join(f"{k}={v}" for k, v in report["edits"].items())
    click.echo(f"edits:        {counts}")
    ck = report["last_checkpoint"]
    click.echo(f"checkpoint:   {ck['id'] + ' at ' + ck['path'] if ck else 'none yet'}")
    pr = report["last_probe_run"]
    click.echo(f"drift probe:  {('passed' if pr['passed'] else 'FAILED') if pr else 'none yet'}")


@cli.group(cls=EditdGroup)
def edits() -> None:
    """List, show and retract edits."""


@edits.command(name="list")
@config_option
@json_option
@click.option("--status", "status_", type=click.Choice([s.value for s in EditStatus]))
@click.option("--kind", "kind_", type=click.Choice([k.value for k in EditKind]))
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--after", help="Id of the last edit of the previous page.")
@click.pass_context
def edits_list(
    ctx: click.Context,
    as_json: bool,
    status_: str | None,
    kind_: str | None,
    limit: int,
    after: str | None,
) -> None:
    """A page of edits in queue order (of one status and kind when given)."""
    cfg = state(ctx).config()
    with _open(cfg, create=False) as st:
        records = EditQueue(st).list(
            EditStatus(status_) if status_ else None,
            limit=limit,
            after=after,
            kind=EditKind(kind_) if kind_ else None,
        )
    if as_json:
        echo_json([r.to_json_dict() for r in records])
        return
    for r in records:
        data = r.to_json_dict()
        what = data.get("error") or (data.get("request") or {}).get("prompt", "")
        click.echo(f"{r.id}  {data['status']:11}  {data['kind']:9}  {str(what)[:60]}")


@edits.command(name="show")
@config_option
@click.argument("edit_id")
@click.pass_context
def edits_show(ctx: click.Context, edit_id: str) -> None:
    """The whole record of one edit, as JSON."""
    cfg = state(ctx).config()
    with _open(cfg, create=False) as st:
        echo_json(EditQueue(st).get(edit_id).to_json_dict())


@edits.command(name="retract")
@config_option
@click.argument("edit_id")
@click.option("--reason", default="retracted from the CLI", show_default=True)
@click.pass_context
def edits_retract(ctx: click.Context, edit_id: str, reason: str) -> None:
    """Retract (forget) an edit: the model answers its prompt as the base model did.

    With the daemon running, it removes the edit from the live model (through the
    API). With no daemon running, the store records the retraction and the next
    start removes the edit from the restored model (the store is the source of truth).
    A daemon that runs but does not answer (another address, still binding) holds
    the store's lock: then nothing is written and the exit status is 1.
    """
    from urllib.parse import quote

    from daemon.cli.client import DaemonUnreachableError, call

    cfg = state(ctx).config()
    try:
        body = call(cfg, "DELETE", f"/v1/edits/{quote(edit_id, safe='')}?reason={quote(reason)}")
        click.echo(f"{body['id']}: retracted")
        return
    except DaemonUnreachableError as exc:
        unreachable = exc
    with (
        _open(cfg, create=False) as st,
        claim_store_offline(
            st.path,
            role="editd edits retract",
            unreachable=unreachable,
            refusing="retracting behind a running daemon's back (it may hold the edit in a batch)",
        ),
    ):
        record = retract_in_store(st, edit_id, reason)
    click.echo(f"{record.id}: retracted (daemon not running: takes effect at its next start)")
