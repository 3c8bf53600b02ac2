"""build_hook_editor: an automatic layout runs locate once and caches it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from daemon.config import Config, StoreConfig, cache_dir
from daemon.editors.hook.config import HookConfig
from daemon.editors.hook.locate import latest_locate, locate_cache_dir
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
    assert editor.settings.layers == tuple(sorted(found.layers))
    assert editor.settings.key_position == found.key_position
    cached = sorted(locate_cache_dir(cache_dir(config)).glob("locate-*.json"))
    again = build_from_config(pristine, config)  # reused, not recomputed
    assert sorted(locate_cache_dir(cache_dir(config)).glob("locate-*.json")) == cached
    assert again.settings.layers == editor.settings.layers
