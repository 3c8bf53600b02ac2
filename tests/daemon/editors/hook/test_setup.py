"""build_hook_editor: the layout resolved from the config (configured values win, layers
sorted and never repeated); an automatic layout runs locate once and caches it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from daemon.config import Config, StoreConfig, cache_dir
from daemon.editors.hook.config import HookConfig, HookLayout
from daemon.editors.hook.locate import latest_locate, locate_cache_dir
from daemon.editors.hook.setup import choose_layout
from daemon.model.loading import load_model
from tests.daemon.editors.hook.conftest import build_from_config


def test_auto_layout_locates_once_and_reuses_the_cache(micro_world: Path, tmp_path: Path) -> None:
    loaded = load_model(str(micro_world), device="cpu")
    config = replace(
        Config(),
        store=StoreConfig(path=tmp_path / "var" / "editd.sqlite3"),
        editors=Config().editors.with_sections(hook=HookConfig(covariance_tokens=5000)),
    )
    assert latest_locate(locate_cache_dir(cache_dir(config)), loaded) is None
    editor = build_from_config(loaded, config)
    pristine = load_model(str(micro_world), device="cpu")  # the editor wrapped ``loaded``
    found = latest_locate(locate_cache_dir(cache_dir(config)), pristine)
    assert found is not None  # located and cached
    assert editor.layout.layers == tuple(sorted(found.layers))
    assert editor.layout.key_position == found.key_position
    cached = sorted(locate_cache_dir(cache_dir(config)).glob("locate-*.json"))
    again = build_from_config(pristine, config)  # reused, not recomputed
    assert sorted(locate_cache_dir(cache_dir(config)).glob("locate-*.json")) == cached
    assert again.layout.layers == editor.layout.layers


def test_configured_layers_and_keys_win_over_located_ones(micro_world: Path) -> None:
    loaded = load_model(str(micro_world), device="cpu")
    cfg = HookConfig(layers=(2, 0), key_position="prompt_last", gate_subject_cos_floor=0.4)
    layout = choose_layout(loaded, cfg, ((1,), "subject_last"))
    assert layout == HookLayout(layers=(0, 2), key_position="prompt_last", subject_cos_floor=0.4)
    located = choose_layout(loaded, HookConfig(), ((1,), "prompt_last"))
    assert (located.layers, located.key_position) == ((1,), "prompt_last")


def test_repeated_or_missing_layers_are_refused() -> None:
    """The config names the key; a layout must hold increasing layers."""
    with pytest.raises(ValueError, match="repeat") as repeated:
        HookConfig(layers=(1, 1))
    assert getattr(repeated.value, "key", None) == "layers"
    for layers in [(), (2, 1), (1, 1)]:
        with pytest.raises(ValueError, match="increasing"):
            HookLayout(layers=layers, key_position="prompt_last", subject_cos_floor=0.5)
