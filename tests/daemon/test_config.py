"""Configuration: defaults, validation errors that name key and file, env overrides."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.config import (
    Config,
    config_as_dict,
    config_path,
    load_config,
    parse_config,
)
from daemon.errors import ConfigError

NO_ENV: dict[str, str] = {}


def write(tmp_path: Path, text: str | bytes, name: str = "editd.toml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_shipped_config_toml_equals_the_built_in_defaults(repo_root: Path) -> None:
    """config.toml documents every key with its default value, and nothing else."""
    shipped = load_config(repo_root / "config.toml", env=NO_ENV)
    defaults = parse_config({}, source=shipped.source, env=NO_ENV)
    assert dataclasses.replace(shipped, source=None) == dataclasses.replace(defaults, source=None)
    data = tomllib.loads((repo_root / "config.toml").read_text())
    expected = config_as_dict(defaults)
    # every key of every section is spelled out in the shipped file
    for section, table in expected.items():
        if section == "editors":
            for sub, keys in table.items():
                assert set(data["editors"][sub]) == set(keys), sub
        else:
            assert set(data[section]) == set(table), section


def test_contract_keys_exist() -> None:
    """The keys other programs rely on (``docs/contracts.md``) keep their names."""
    cfg = Config()
    for section, key in [
        ("model", "name_or_path"),
        ("model", "device"),
        ("model", "dtype"),
        ("store", "path"),
        ("checkpoints", "dir"),
        ("api", "host"),
        ("api", "port"),
        ("api", "token"),
        ("router", "default_backend"),
        ("kinds", "withheld_answer"),
        ("kinds", "max_target_tokens"),
    ]:
        assert hasattr(getattr(cfg, section), key), f"{section}.{key}"


def test_partial_file_overrides_only_what_it_names(tmp_path: Path) -> None:
    path = write(tmp_path, "[api]\nport = 9001\n[editors.hook]\nlayers = [1, 2]\n")
    cfg = load_config(path, env=NO_ENV)
    assert cfg.api.port == 9001
    assert cfg.editors.hook.layers == (1, 2)
    assert cfg.api.host == "127.0.0.1"
    assert cfg.worker == Config().worker


@pytest.mark.parametrize(
    ("value", "parsed"), [('"auto"', "auto"), ("0.6", 0.6), ("-1", -1.0), ("1", 1.0)]
)
def test_the_subject_floor_is_a_number_or_auto(
    tmp_path: Path, value: str, parsed: float | str
) -> None:
    path = write(tmp_path, f"[editors.hook]\ngate_subject_cos_floor = {value}\n")
    got = load_config(path, env=NO_ENV).editors.hook.gate_subject_cos_floor
    assert got == parsed and type(got) is type(parsed)


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    path = write(
        sub,
        '[store]\npath = "data/x.sqlite3"\n[checkpoints]\ndir = "/abs/ck"\n'
        '[model]\nimport_cache = "models"\n[drift]\nprobes = "probes.jsonl"\n',
    )
    cfg = load_config(path, env=NO_ENV)
    assert cfg.store.path == sub.resolve() / "data" / "x.sqlite3"
    assert cfg.model.import_cache == sub.resolve() / "models"
    assert cfg.drift.probes == str(sub.resolve() / "probes.jsonl")
    assert cfg.checkpoints.dir == Path("/abs/ck")
    assert cfg.source == path.resolve()


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("[api]\nprot = 1\n", "api.prot", "unknown key"),
        ("[nope]\nx = 1\n", "nope", "unknown key"),
        ('[api]\nport = "80"\n', "api.port", "expected an integer, got string"),
        ("[api]\nport = 70000\n", "api.port", "between 0 and 65535"),
        ("[worker]\nverify = 1\n", "worker.verify", "expected true or false"),
        ("[worker]\nbatch_size = 0\n", "worker.batch_size", "must be > 0"),
        ("[worker]\nbatch_size = 2.5\n", "worker.batch_size", "expected an integer"),
        ('[model]\ndevice = "tpu"\n', "model.device", "one of 'auto', 'cpu', 'cuda'"),
        ('[editors.hook]\nlayers = [1, "2"]\n', "editors.hook.layers", "expected an integer"),
        ("[editors.hook]\nlayers = 3\n", "editors.hook.layers", "a list of an integer"),
        ("[editors.melo]\nkey_layer = -2\n", "editors.melo.key_layer", "-1 (auto)"),
        (
            '[editors.hook]\ngate_subject_cos_floor = "bogus"\n',
            "editors.hook.gate_subject_cos_floor",
            "expected a number or 'auto', got string 'bogus'",
        ),
        (
            "[editors.hook]\ngate_subject_cos_floor = 1.5\n",
            "editors.hook.gate_subject_cos_floor",
            "must be in [-1, 1] or 'auto'; got 1.5",
        ),
        (
            "[editors.hook]\ngate_subject_cos_floor = true\n",
            "editors.hook.gate_subject_cos_floor",
            "expected a number or 'auto', got boolean",
        ),
        ("[editors]\nmelo = 3\n", "editors.melo", "expected a table"),
        ("api = 3\n", "api", "expected a table"),
        ('[scheduler]\nnightly_time = "25:00"\n', "scheduler.nightly_time", "HH:MM"),
        ("[drift]\nmin_retention = 1.5\n", "drift.min_retention", "between 0 and 1"),
        ('[store]\npath = ""\n', "store.path", "expected a path"),
        ("[worker]\nbackoff_base_s = 10.0\nbackoff_max_s = 5.0\n", "worker.backoff_max_s", ">="),
    ],
)
def test_bad_values_name_the_key_and_the_file(
    tmp_path: Path, text: str, key: str, fragment: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=NO_ENV)
    err = info.value
    assert err.key == key
    assert str(path) in str(err)
    assert f"key '{key}'" in str(err)
    assert fragment in str(err)
    assert "\n" not in str(err)


def test_malformed_toml_and_bad_bytes_are_one_line_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "[api\nport = 1\n")
    with pytest.raises(ConfigError, match="invalid TOML") as info:
        load_config(path, env=NO_ENV)
    assert str(path) in str(info.value)
    bad = write(tmp_path, b'[api]\nhost = "\xff\xfe"\n', name="bad.toml")
    with pytest.raises(ConfigError, match="not valid UTF-8 at byte 14"):
        load_config(bad, env=NO_ENV)


def test_explicit_missing_file_is_an_error_but_implicit_default_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml", env=NO_ENV)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(None, env={"EDITD_CONFIG": str(tmp_path / "gone.toml")})
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, env=NO_ENV)
    assert cfg.source is None
    assert cfg.store.path == tmp_path.resolve() / "var" / "editd.sqlite3"


def test_config_path_precedence(tmp_path: Path) -> None:
    env = {"EDITD_CONFIG": "/etc/editd/editd.toml"}
    assert config_path("x.toml", env) == Path("x.toml")
    assert config_path(None, env) == Path("/etc/editd/editd.toml")
    assert config_path(None, {}) == Path("config.toml")


def test_environment_overrides_paths_and_secrets(tmp_path: Path) -> None:
    path = write(tmp_path, '[api]\ntoken = "from-file"\n')
    env = {"EDITD_API_TOKEN": "s3cret-from-the-env", "EDITD_STORE_PATH": "/srv/editd/db.sqlite3"}
    cfg = load_config(path, env=env)
    assert cfg.api.token == "s3cret-from-the-env"
    assert cfg.store.path == Path("/srv/editd/db.sqlite3")
    assert config_as_dict(cfg)["api"]["token"] == "***"


# --- property-based -----------------------------------------------------------------

toml_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=12),
    st.lists(st.integers(min_value=-3, max_value=40), max_size=4),
)
section_names = st.sampled_from(
    [
        "model",
        "store",
        "router",
        "worker",
        "scheduler",
        "checkpoints",
        "drift",
        "api",
        "feeds",
        "log",
        "bogus",
    ]
)


def _keys_of(section: str) -> list[str]:
    if section == "bogus":
        return ["x"]
    cls = typing.get_type_hints(Config)[section]
    return [f.name for f in dataclasses.fields(cls)] + ["not_a_key"]


@st.composite
def config_documents(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for section in draw(st.lists(section_names, max_size=4, unique=True)):
        keys = draw(st.lists(st.sampled_from(_keys_of(section)), max_size=3, unique=True))
        doc[section] = {k: draw(toml_scalars) for k in keys}
    return doc


@settings(max_examples=300, deadline=None)
@given(config_documents())
def test_any_document_either_loads_or_raises_a_config_error_naming_a_key(
    doc: dict[str, Any],
) -> None:
    """No document crashes the loader with anything but a ConfigError that names its key."""
    try:
        cfg = parse_config(doc, source=Path("/tmp/fuzz.toml"), env=NO_ENV)
    except ConfigError as e:
        assert e.key is not None
        assert e.key.split(".")[0] in doc
        assert "/tmp/fuzz.toml" in str(e)
        return
    assert isinstance(cfg, Config)
    for section, table in doc.items():
        for key, value in table.items():
            got = getattr(getattr(cfg, section), key)
            if isinstance(value, list):
                assert got == tuple(value)
            elif isinstance(got, Path):
                assert got.name == Path(value).name
            else:
                assert got == value


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=65535), st.integers(min_value=1, max_value=500))
def test_valid_values_round_trip(port: int, batch: int) -> None:
    cfg = parse_config({"api": {"port": port}, "worker": {"batch_size": batch}}, env=NO_ENV)
    assert (cfg.api.port, cfg.worker.batch_size) == (port, batch)
