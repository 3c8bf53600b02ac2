"""``editd eval``: stream edits through an editor and write the lifelong-editing report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from daemon.cli.app import cli, config_option, state
from daemon.errors import EvalDataError

if TYPE_CHECKING:
    from daemon.config import Config
    from daemon.eval.harness import EvalCase


def _checkpoints(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        marks = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter("expected comma-separated edit counts, e.g. 10,100,1000") from None
    if not marks or any(m < 1 for m in marks):
        raise click.BadParameter("expected positive edit counts, e.g. 10,100,1000")
    return marks


def read_cases(path: Path, fmt: str) -> tuple[list[EvalCase], list[str]]:
    """Eval cases from an editd edits file or a benchmark file; plus one line per error."""
    from daemon.eval.cases import case_from_request, load_cases
    from daemon.eval.loaders import FORMATS, convert, detect_format
    from store.records import parse_edit_request

    if fmt == "auto":
        try:
            fmt = detect_format(path)
        except EvalDataError:
            fmt = "editd"
    if fmt == "editd":
        loaded = load_cases(path)
        return list(loaded.cases), [str(e) for e in loaded.errors]
    if fmt not in FORMATS:
        raise EvalDataError(f"unknown format '{fmt}'", path=str(path))
    conversion = convert(path, fmt)
    cases = [
        case_from_request(parse_edit_request(r), f"{fmt}-{i}")
        for i, r in enumerate(conversion.requests, start=1)
    ]
    return cases, [str(e) for e in conversion.errors]


def _auto_settings(editor_name: str, cfg: Config) -> dict[str, Any]:
    """What shapes ``auto``'s dispatch: the router section and whether edits are verified."""
    if editor_name != "auto":
        return {}
    router = cfg.router
    return {
        "router": {
            "default_backend": router.default_backend,
            "hook_max_target_tokens": router.hook_max_target_tokens,
            "escalate_to_melo": router.escalate_to_melo,
            "backends": list(router.backends),
        },
        "verify": cfg.worker.verify,
    }


def _eval_kind(
    cfg: Config,
    task: str,
    model_dir: Path,
    editor_name: str,
    edits_path: Path | None,
    fmt: str,
    n: int | None,
    scope: str,
    batch_size: int,
    out_dir: Path,
) -> None:
    """``--task forget`` or ``behaviour``: the protocols of :mod:`daemon.eval.forgetting`
    and :mod:`daemon.eval.behaviour`, written to ``<out>/<task>.json``."""
    import dataclasses
    import json

    from daemon.editors.registry import backend_names
    from daemon.eval.behaviour import BehaviourSuite, load_sets, run_suite
    from daemon.eval.forgetting import forget_known
    from daemon.eval.loaders import convert
    from daemon.eval.routed import build_routed_editor
    from daemon.model.loading import load_model
    from store.records import Scope, parse_edit_request

    if editor_name != "auto" and editor_name not in map(str, backend_names()):
        raise click.UsageError(f"--task {task} needs --editor auto or a back-end")
    if task == "forget" and (edits_path is None or n is None):
        raise click.UsageError("--task forget needs --edits (CounterFact or zsRE) and --n")
    if editor_name != "auto":
        router = dataclasses.replace(cfg.router, default_backend=editor_name)
        cfg = dataclasses.replace(cfg, router=router)
    loaded = load_model(str(model_dir), device=cfg.model.device, dtype=cfg.model.dtype)
    engine = build_routed_editor(loaded, cfg).engine
    if task == "forget":
        assert edits_path is not None and n is not None
        conversion = convert(edits_path, fmt)
        facts = [parse_edit_request(r) for r in conversion.requests]
        report = forget_known(
            engine, facts, n, cfg.router, scope=Scope(scope), batch_size=batch_size
        )
        edited = report["edited"]
        click.echo(
            f"forgot {report['known']} known facts: leak prompt {edited['leak']['prompt']:.3f}, "
            f"rephrase {edited['leak']['rephrase']:.3f}, adversarial "
            f"{edited['leak']['adversarial']:.3f}; locality {edited['locality']:.3f}; "
            f"perplexity {report['base']['perplexity']:.3f} -> {edited['perplexity']:.3f}"
        )
    else:
        report = run_suite(BehaviourSuite(load_sets(), engine), cfg.router)
        edited = report["edited"]
        click.echo(
            f"identity held-out {edited['identity']['heldout']:.3f}; harmful refused "
            f"{edited['refusal']['edited']:.3f} (held-out {edited['refusal']['heldout']:.3f}), "
            f"benign refused {edited['refusal']['benign_refused']:.3f}; pronoun gap "
            f"{report['base']['bias']['pronoun_gap']:.3f} -> {edited['bias']['pronoun_gap']:.3f}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{task}.json"
    report = {"task": task, "model": str(model_dir), "editor": editor_name, **report}
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    click.echo(f"wrote {path}")


class EditorName(click.ParamType[str]):
    """An editor ``editd eval`` can build: the registry's names (read when the option is
    used, so ``editd --help`` does not load the back-ends) or ``auto``."""

    name = "editor"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from daemon.editors.registry import editor_names

        known = (*map(str, editor_names()), "auto")
        if value not in known:
            self.fail(f"{value!r} is not one of {', '.join(map(repr, known))}", param, ctx)
        return str(value)


@cli.command(name="eval")
@config_option
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)
@click.option(
    "--editor",
    "editor_name",
    required=True,
    type=EditorName(),
    help="noop, ft, a registered back-end (hook, melo) or auto: the daemon's routing, "
    "verification and escalation over [router] backends.",
)
@click.option(
    "--task",
    type=click.Choice(["edits", "forget", "behaviour"]),
    default="edits",
    show_default=True,
    help="edits: the lifelong-editing report; forget: forget N facts the model knows "
    "(from --edits, CounterFact or zsRE) and score leaks; behaviour: the identity, refusal "
    "and bias suite. forget and behaviour run the daemon's dispatch (--editor auto, or a "
    "back-end for every edit).",
)
@click.option(
    "--scope",
    type=click.Choice(["prompt", "subject"]),
    default="prompt",
    show_default=True,
    help="--task forget: the forget requests' scope.",
)
@click.option(
    "--edits",
    "edits_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.option(
    "--format",
    "fmt",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "editd", "counterfact", "zsre", "knowedit", "mquake"]),
)
@click.option("--n", type=click.IntRange(min=1))
@click.option("--checkpoints", callback=_checkpoints, default="10,100,1000", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--send-rephrases", is_flag=True, help="Also give the editor the training-template rephrases."
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option(
    "--ppl-text",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Held-out text (.txt, one text a line, or .jsonl with 'text') for perplexity before "
    "and after; default: shipped Wikipedia biographies, except on a fact world.",
)
@click.pass_context
def eval_(
    ctx: click.Context,
    model_dir: Path,
    editor_name: str,
    task: str,
    scope: str,
    edits_path: Path | None,
    fmt: str,
    n: int | None,
    checkpoints: tuple[int, ...],
    batch_size: int,
    send_rephrases: bool,
    out_dir: Path,
    quiet: bool,
    ppl_text: Path | None,
) -> None:
    """Run N edits through an editor; score efficacy, generalisation, locality, retention."""
    from daemon.editors.hook.setup import read_text_source
    from daemon.engine.engine import build_editor
    from daemon.eval.basetask import world_base_task
    from daemon.eval.harness import (
        CheckpointScores,
        EvalSettings,
        Harness,
        effective_checkpoints,
    )
    from daemon.eval.perplexity import heldout_texts
    from daemon.eval.report import EvalReport, markdown_table, write_report
    from daemon.eval.routed import build_routed_editor
    from daemon.model.loading import load_model
    from daemon.model.source import apply_threads
    from daemon.service.drift_job import drift_probes

    cfg = state(ctx).config()
    apply_threads(cfg.model.threads)
    if task != "edits":
        _eval_kind(
            cfg, task, model_dir, editor_name, edits_path, fmt, n, scope, batch_size, out_dir
        )
        return
    if edits_path is None or n is None:
        raise click.UsageError("--task edits needs --edits and --n")
    cases, errors = read_cases(edits_path, fmt)
    for line in errors[:20]:
        click.echo(f"skipped: {line}", err=True)
    if errors:
        click.echo(f"{len(errors)} record(s) could not be converted", err=True)
    if not cases:
        raise EvalDataError("no usable edits", path=str(edits_path))
    loaded = load_model(str(model_dir), device=cfg.model.device, dtype=cfg.model.dtype)
    # the daemon's editors: MELO calibrates its radius on the drift probes, as in serve
    probes = [p.prompt for p in drift_probes(cfg, loaded.name_or_path)] if cfg.drift.enabled else []
    editor = (
        build_routed_editor(loaded, cfg, calibration_prompts=probes)
        if editor_name == "auto"
        else build_editor(editor_name, loaded, cfg, calibration_prompts=probes)
    )
    settings = EvalSettings(
        n=min(n, len(cases)),
        checkpoints=checkpoints,
        batch_size=batch_size,
        send_rephrases=send_rephrases,
        progress=not quiet,
    )
    subjects = {c.spec.subject for c in cases[: settings.n] if c.spec.subject}
    base_task = world_base_task(model_dir, exclude_subjects=subjects) or []
    is_world = (model_dir / "world.json").is_file()
    ppl_texts = read_text_source(str(ppl_text), str(model_dir)) if ppl_text else []
    if not ppl_texts and not is_world:
        ppl_texts = heldout_texts()  # a fact world has its base task instead

    def report_of(scores: Sequence[CheckpointScores]) -> EvalReport:
        return EvalReport(
            editor=editor_name,
            model=str(model_dir),
            n_edits=settings.n,
            checkpoints=tuple(scores),
            settings={
                "batch_size": batch_size,
                "send_rephrases": send_rephrases,
                "checkpoints": list(checkpoints),
                "threads": cfg.model.threads,
                "device": str(loaded.device),
                **_auto_settings(editor_name, cfg),
            },
            data={
                "edits": str(edits_path),
                "format": fmt,
                "unconverted": len(errors),
                "base_task_facts": len(base_task),
                "perplexity_texts": str(ppl_text)
                if ppl_text
                else ("wikibio-heldout" if ppl_texts else None),
            },
        )

    done: list[CheckpointScores] = []

    def checkpointed(scores: CheckpointScores) -> None:
        """Each checkpoint rewrites the report: a long run that is stopped keeps its scores."""
        done.append(scores)
        if len(done) < len(effective_checkpoints(checkpoints, settings.n)):
            write_report(report_of(done), out_dir)

    harness = Harness(
        editor,
        loaded,
        settings,
        base_task=base_task,
        ppl_texts=ppl_texts,
        on_checkpoint=checkpointed,
    )
    report = report_of(harness.run(cases))
    paths = write_report(report, out_dir)
    click.echo(markdown_table(report))
    click.echo("wrote " + ", ".join(str(p) for p in paths))
