"""``editd demo``: a walk-through of the daemon on the configured fact world.

Starts ``editd serve`` as a child process on a free loopback port with its own
temporary state (store and checkpoints; never the configured store), draws a
handful of counterfactual edits from the world, asks the model before and
after, sends half through the hook back-end and half through MELO, retracts
one, prints a summary, and stops the daemon with SIGTERM (it must exit 0).

The configured model is used (``world:small`` by default, built once and
cached). Content-addressed caches beside the configured store (hook
statistics, locate results, drift base scores) are shared so a second run
starts in seconds; the store itself is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click

from daemon.cli.app import CliError, cli, config_option, state
from daemon.cli.client import call
from daemon.config import Config, config_as_dict
from daemon.errors import EditdError
from daemon.model import arch
from daemon.model.answers import continuation_matches
from daemon.model.generate import first_sentence
from daemon.model.loading import LoadedModel

N_EDITS = 6
STARTUP_TIMEOUT_S = 900.0
SETTLE_TIMEOUT_S = 900.0
STOP_TIMEOUT_S = 180.0
SHARED_CACHES = ("stats", "locate", "drift")
ENV_DROPPED = ("EDITD_CONFIG", "EDITD_STORE_PATH", "EDITD_CHECKPOINTS_DIR", "EDITD_API_TOKEN")
STARTUP_EVENTS = {
    "model_loaded": "model loaded",
    "covariance_stats_computed": "hook covariance statistics computed (cached for next time)",
    "hook_editor_layout": "hook editor built",
    "melo_editor_ready": "MELO editor built",
    "drift_base_scored": "drift probes scored on the base model",
    "restored": "store restored",
    "daemon_ready": "worker and scheduler running",
}


def _describe_model(loaded: LoadedModel) -> None:
    model, params = loaded.model, sum(p.numel() for p in loaded.model.parameters())
    click.echo(f"model:   {loaded.name_or_path}")
    click.echo(
        f"         {loaded.arch.model_type}, {arch.num_layers(model)} layers, hidden "
        f"{arch.hidden_size(model)}, {params:,} parameters, {loaded.dtype} on {loaded.device}"
    )


def _toml(data: dict[str, Any], prefix: str = "") -> list[str]:
    """TOML lines for ``config_as_dict`` output (nested tables of scalars and lists)."""
    lines: list[str] = []
    for name, values in data.items():
        lines.append(f"[{prefix}{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items() if not isinstance(v, dict)]
        lines += _toml({k: v for k, v in values.items() if isinstance(v, dict)}, f"{prefix}{name}.")
    return lines


def demo_config(cfg: Config, state_dir: Path) -> Path:
    """Write the demo's config: the user's settings, with state under ``state_dir``."""
    data = config_as_dict(cfg)
    data["store"]["path"] = str(state_dir / "editd.sqlite3")
    data["checkpoints"]["dir"] = str(state_dir / "checkpoints")
    data["feeds"]["spool_dir"] = str(state_dir / "spool")
    data["api"].update(host="127.0.0.1", port=0, token="")
    data["log"].update(level="info", format="json")
    path = state_dir / "editd-demo.toml"
    path.write_text("\n".join(_toml(data)) + "\n", encoding="utf-8")
    return path


def share_caches(cfg: Config, state_dir: Path) -> list[str]:
    """Link the configured state folder's caches into ``state_dir``; the names linked."""
    home = cfg.store.path.parent
    if not home.is_dir() or home.resolve() == state_dir.resolve():
        return []
    linked = []
    for name in SHARED_CACHES:
        link = state_dir / name
        if not (link.exists() or link.is_symlink()):
            (home / name).mkdir(exist_ok=True)
            link.symlink_to((home / name).resolve(), target_is_directory=True)
            linked.append(name)
    return linked


class DemoServer:
    """``editd serve`` as a child process, and calls to its HTTP API."""

    def __init__(self, cfg: Config, config_path: Path, state_dir: Path) -> None:
        self.cfg, self.config_path = cfg, config_path
        self.port_file, self.log_path = state_dir / "port", state_dir / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = self.ready_s = 0.0

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ENV_DROPPED}
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        cmd = [sys.executable, "-m", "daemon.cli", "--config", str(self.config_path), "serve"]
        cmd += ["--port", "0", "--port-file", str(self.port_file)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _failed(self, what: str) -> CliError:
        tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
        return CliError(f"{what}; last lines of {self.log_path}:\n{tail}")

    def wait_ready(self) -> None:
        """Poll ``/healthz`` until 200, echoing the daemon's start-up events."""
        assert self.proc is not None
        seen, beat = 0, 0.0
        while self.elapsed() < STARTUP_TIMEOUT_S:
            seen = self._echo_events(seen)
            if self.proc.poll() is not None:
                raise self._failed(f"the daemon exited with status {self.proc.returncode}")
            if self._healthy():
                self._echo_events(seen)
                self.ready_s = self.elapsed()
                return
            if self.elapsed() - beat >= 15:
                beat = self.elapsed()
                click.echo(f"  [{beat:6.1f} s] still starting ...")
            time.sleep(0.2)
        raise self._failed(f"the daemon was not ready after {STARTUP_TIMEOUT_S:.0f} s")

    def events(self) -> list[dict[str, Any]]:
        """The daemon's structured log events so far (the JSON lines of its log)."""
        out: list[dict[str, Any]] = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line) if line.startswith("{") else None
                out += [event] if isinstance(event, dict) else []
        return out

    def _echo_events(self, seen: int) -> int:
        events = self.events()
        for event in events[seen:]:
            if event.get("event") in STARTUP_EVENTS:
                click.echo(f"  [{self.elapsed():6.1f} s] {STARTUP_EVENTS[event['event']]}")
        return len(events)

    def _healthy(self) -> bool:
        text = self.port_file.read_text().strip() if self.port_file.is_file() else ""
        if not text:
            return False
        self.cfg = replace(self.cfg, api=replace(self.cfg.api, host="127.0.0.1", port=int(text)))
        try:
            return bool(call(self.cfg, "GET", "/healthz", timeout=5).get("status") == "ok")
        except (EditdError, AttributeError):
            return False

    def call(self, method: str, path: str, body: Any = None) -> Any:
        return call(self.cfg, method, path, body)

    def complete(self, prompts: list[str], max_tokens: int) -> list[str]:
        body = {"prompt": prompts, "max_tokens": max_tokens, "temperature": 0}
        choices = self.call("POST", "/v1/completions", body)["choices"]
        return [first_sentence(c["text"]) for c in choices]

    def stop(self, *, force: bool = False) -> int:
        """SIGTERM (SIGKILL with ``force`` or after ``STOP_TIMEOUT_S``); the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return -1 if self.proc is None else self.proc.returncode
        if not force:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        self.proc.kill()
        return self.proc.wait(timeout=30)


@dataclass
class DemoEdit:
    """One edit of the walk-through and what the model answered around it."""

    request: dict[str, Any]
    before: str = ""
    after: str = ""
    record: dict[str, Any] | None = None

    @property
    def id(self) -> str:
        return str(self.request["id"])

    @property
    def status(self) -> str:
        return "?" if self.record is None else str(self.record["status"])

    def backend(self) -> str:
        """The back-end that holds the edit (and the one it was routed to, if another)."""
        if self.record is None or not self.record.get("backend"):
            return "-"
        held = str(self.record["backend"])
        routed = (self.record.get("result") or {}).get("route", {}).get("backend")
        return f"{held} (from {routed})" if routed and routed != held else held

    def verified(self) -> str:
        if self.status != "applied":
            return self.status
        check = (self.record or {}).get("result", {}).get("verification")
        return "-" if check is None else ("yes" if check["passed"] else "no")


def draw_edits(folder: Path, loaded: LoadedModel, n: int, seed: int, auto: bool) -> list[DemoEdit]:
    """``n`` counterfactual edits: first half hook, second half MELO (or all auto)."""
    from daemon.world.editsets import counterfactual_edits

    requests = counterfactual_edits(folder, loaded.model, loaded.tokenizer, n, seed=seed)
    for i, request in enumerate(requests):
        request["id"] = f"demo-{seed}-{request['id']}"
        request["backend"] = "auto" if auto else ("hook" if i < (n + 1) // 2 else "melo")
        request["source"] = {"kind": "cli", "item_id": "editd-demo"}
    return [DemoEdit(r) for r in requests]


def _cut(text: str, width: int) -> str:
    text = text.strip()
    return text if len(text) <= width else text[: width - 2] + ".."


def print_table(edits: list[DemoEdit]) -> None:
    w = min(44, max(len(e.request["prompt"]) for e in edits))
    cols = f"{'before':<14} {'target':<14} {'after':<14} {'back-end':<18} verified"
    click.echo(f"  {'prompt':<{w}}  {cols}")
    for e in edits:
        answers = (e.before, e.request["target"], e.after)
        click.echo(
            f"  {_cut(e.request['prompt'], w):<{w}}  "
            + " ".join(f"{_cut(a, 14):<14}" for a in answers)
            + f" {e.backend():<18} {e.verified()}"
        )


def wait_settled(server: DemoServer, edits: list[DemoEdit]) -> float:
    """Poll the edits until none is queued or applying; the seconds it took."""
    t0, shown = time.monotonic(), ""
    while time.monotonic() - t0 < SETTLE_TIMEOUT_S:
        for e in edits:
            e.record = server.call("GET", f"/v1/edits/{e.id}")
        counts = Counter(e.status for e in edits)
        line = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        if line != shown:
            click.echo(f"  [{time.monotonic() - t0:6.1f} s] {line}")
            shown = line
        if not {"queued", "applying"} & counts.keys():
            return time.monotonic() - t0
        time.sleep(0.3)
    raise CliError(f"edits not settled after {SETTLE_TIMEOUT_S:.0f} s: {shown}")


def walk_through(server: DemoServer, edits: list[DemoEdit], budget: int) -> list[str]:
    """Before, submit, after, retract, summary; the problems found (empty: all good)."""
    problems: list[str] = []
    prompts = [e.request["prompt"] for e in edits]
    for e, answer in zip(edits, server.complete(prompts, budget), strict=True):
        e.before = answer
    click.echo(f"\n[4/6] submitting {len(edits)} edits (POST /v1/edits) and waiting until applied")
    ids = server.call("POST", "/v1/edits", {"edits": [e.request for e in edits]})["ids"]
    if ids != [e.id for e in edits]:
        problems.append(f"the daemon answered ids {ids}")
    seconds = wait_settled(server, edits)
    for e, answer in zip(edits, server.complete(prompts, budget), strict=True):
        e.after = answer
    click.echo("\nbefore and after (greedy answers from POST /v1/completions):")
    print_table(edits)
    applied = [e for e in edits if e.status == "applied"]
    held = [e for e in applied if continuation_matches(e.after, e.request["target"])]
    click.echo(f"  {len(held)} of {len(applied)} applied edits now answer their new target")
    for e in edits:
        if e.status != "applied" and e.record is not None:
            click.echo(f"  {e.id} {e.status}: {e.record.get('error')}")
    if not applied:
        return [*problems, "no edit was applied"]
    problems += retract_one(server, applied, budget)
    summary(server, edits, seconds)
    return problems


def retract_one(server: DemoServer, applied: list[DemoEdit], budget: int) -> list[str]:
    """Retract one applied edit (a hook one if any): its prompt must answer as before."""
    victim = next((e for e in applied if e.backend() == "hook"), applied[0])
    click.echo(f"\n[5/6] retracting {victim.id} (DELETE /v1/edits/{victim.id})")
    victim.record = record = server.call("DELETE", f"/v1/edits/{victim.id}")
    others = [e for e in applied if e is not victim]
    answers = server.complete([e.request["prompt"] for e in [victim, *others]], budget)
    back = answers[0] == victim.before
    click.echo(f"  status:        {record['status']}")
    click.echo(f"  prompt:        {victim.request['prompt']}")
    click.echo(f"  now answers:   {answers[0].strip()!r}   (edited: {victim.after.strip()!r})")
    click.echo(f"  base answered: {victim.before.strip()!r}   -> back to the base model: {back}")
    kept = sum(e.after == a for e, a in zip(others, answers[1:], strict=True))
    click.echo(f"  the other applied edits answer as before: {kept} of {len(others)}")
    problems = [] if back else [f"{victim.id}: retraction did not restore the base answer"]
    if record["status"] != "retracted":
        problems.append(f"{victim.id}: status {record['status']} after DELETE")
    return problems


def summary(server: DemoServer, edits: list[DemoEdit], seconds: float) -> None:
    status = server.call("GET", "/v1/status")
    escalated = sum(1 for e in edits if "(from hook)" in e.backend())
    per_backend = ", ".join(f"{b} {n}" for b, n in sorted(status["applied_by_backend"].items()))
    click.echo("\n[6/6] summary")
    click.echo(
        f"  edits:          {', '.join(f'{k} {v}' for k, v in status['edits'].items() if v)}"
    )
    click.echo(f"  applied now:    {per_backend or 'none'} (by back-end, after the retraction)")
    if escalated:
        click.echo(f"  escalated:      {escalated} hook edit(s) failed there and went to MELO")
        for event in server.events():
            if event.get("event") == "hook_batch_refused":
                click.echo(f"                  hook refused a batch: {event.get('reason')}")
    for backend, health in sorted(status.get("backend_health", {}).items()):
        if health["window_edits"]:
            verdict = "DEGRADED: " + "; ".join(health["reasons"]) if health["degraded"] else "ok"
            click.echo(
                f"  {backend + ' health:':<16}{health['window_edits']} edits, "
                f"{health['verification_failures']} failed verification, "
                f"{health['escalations']} escalated ({verdict})"
            )
    click.echo(
        f"  time:           {seconds:.1f} s from submit to settled for {len(edits)} edits "
        f"({seconds / len(edits):.2f} s per edit, including the worker's batching wait)"
    )
    click.echo(f"  daemon start:   {server.ready_s:.1f} s to /healthz 200")
    last, restore = status.get("last_checkpoint"), status.get("restore") or {}
    click.echo(
        f"  status:         queue depth {status['queue_depth']}, back-ends "
        f"{', '.join(status['backends'])}, last checkpoint "
        f"{last['id'] if last else 'none yet'}, restore at start {restore.get('seconds')} s"
    )


def _shutdown_checkpoint(state_dir: Path) -> str:
    from store.checkpoints import list_checkpoints
    from store.db import Store

    with Store.open(state_dir / "editd.sqlite3", create=False) as st:
        found = list_checkpoints(st, limit=1)
    return f"{found[0].id} ({found[0].edit_count} edits)" if found else "none"


def _prepare_state(cfg: Config, state_dir: Path | None) -> Path:
    if state_dir is None:
        return Path(tempfile.mkdtemp(prefix="editd-demo-"))
    if (state_dir / "editd.sqlite3").exists():
        raise CliError(f"{state_dir} already holds a store: give an empty or new folder")
    if state_dir.resolve() == cfg.store.path.parent.resolve():
        raise CliError(f"{state_dir} is the configured store's folder: the demo needs its own")
    state_dir.mkdir(parents=True, exist_ok=True)
    return state_dir


@cli.command()
@config_option
@click.option("--n", "n_edits", type=click.IntRange(2, 32), default=N_EDITS, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Which edits are drawn.")
@click.option("--auto", is_flag=True, help="Let the router choose every edit's back-end.")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the demo's store, checkpoints and log here (default: a temp folder, removed).",
)
@click.pass_context
def demo(ctx: click.Context, n_edits: int, seed: int, auto: bool, state_dir: Path | None) -> None:
    """Walk through the daemon: edit the fact world through both back-ends, retract one."""
    from daemon.model.source import load_configured_model, resolve_model_source
    from daemon.world.build import WORLD_FILE, load_world
    from daemon.world.evaluate import answer_budget

    t_start, cfg = time.monotonic(), state(ctx).config()
    click.echo("[1/6] the model (the first run builds the fact world: a few minutes)")
    folder = Path(resolve_model_source(cfg.model))
    if not (folder / WORLD_FILE).is_file():
        raise CliError(
            f"editd demo draws its edits from a fact world's {WORLD_FILE}, and "
            f"'{cfg.model.name_or_path}' has none: set [model] name_or_path = \"world:small\" "
            "(the default) or a folder made by 'editd world build'"
        )
    keep = state_dir is not None
    state_dir = _prepare_state(cfg, state_dir)
    server = DemoServer(cfg, demo_config(cfg, state_dir), state_dir)
    linked, ok = share_caches(cfg, state_dir), False
    try:
        server.start()  # the daemon starts while this process draws the edits
        loaded = load_configured_model(cfg.model, progress=False)
        _describe_model(loaded)
        edits = draw_edits(folder, loaded, n_edits, seed, auto)
        budget = answer_budget(loaded.tokenizer, load_world(folder))
        del loaded
        how = "the router chooses back-ends" if auto else "half forced to hook, half to MELO"
        click.echo(f"edits:   {len(edits)} counterfactual edits drawn from the world ({how})")
        click.echo(f"\n[2/6] starting 'editd serve' on a free loopback port (state: {state_dir})")
        if linked:
            click.echo(f"  caches shared with {cfg.store.path.parent}: {', '.join(linked)}")
        server.wait_ready()
        click.echo(f"  ready on port {server.cfg.api.port} after {server.ready_s:.1f} s")
        click.echo(f"\n[3/6] asking the model {len(edits)} questions before any edit")
        problems = walk_through(server, edits, budget)
        code = server.stop()
        click.echo(f"\nSIGTERM: the daemon exited with status {code}")
        if code != 0:
            problems.append(f"the daemon exited with status {code} after SIGTERM")
        else:
            click.echo(f"  shutdown checkpoint: {_shutdown_checkpoint(state_dir)}")
        if problems:
            raise CliError("; ".join(problems))
        ok = True
        click.echo(f"\ndemo finished in {time.monotonic() - t_start:.0f} s")
    finally:
        server.stop(force=True)
        if ok and not keep:
            shutil.rmtree(state_dir, ignore_errors=True)
        elif not ok:
            click.echo(f"state and daemon log kept in {state_dir}", err=True)
