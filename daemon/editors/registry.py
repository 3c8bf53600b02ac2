"""Editor names → constructors. The worker and ``editd eval`` build editors here."""

from __future__ import annotations

from collections.abc import Sequence

from daemon.config import Config
from daemon.editors.base import Editor
from daemon.editors.ft import FtConfig, FtEditor
from daemon.editors.noop import NoopEditor
from daemon.model.loading import LoadedModel

EDITOR_NAMES = ("noop", "ft", "hook", "melo")


def make_editor(
    name: str, loaded: LoadedModel, config: Config, *, calibration_prompts: Sequence[str] = ()
) -> Editor:
    """A fresh editor called ``name`` bound to ``loaded``'s model.

    ``calibration_prompts`` (MELO only): prompts edits must leave alone, e.g. the
    drift probes; the routing radius is calibrated on them (topped up with samples).
    """
    if name == "noop":
        return NoopEditor()
    if name == "ft":
        return FtEditor(loaded.model, loaded.tokenizer, FtConfig())
    if name == "hook":
        from daemon.editors.hook.setup import build_hook_editor

        return build_hook_editor(loaded, config)
    if name == "melo":
        from daemon.editors.melo.editor import MeloEditor

        cfg = config.editors.melo
        return MeloEditor(
            loaded.model,
            loaded.tokenizer,
            cfg,
            calibration_prompts=calibration_prompts,
            radius_fraction=cfg.radius_fraction,
            max_target_tokens=cfg.max_target_tokens,
            stop_nll=cfg.stop_nll,
        )
    raise ValueError(f"unknown editor '{name}' (known: {', '.join(EDITOR_NAMES)})")
