"""Configuration: ``config.toml`` parsed with ``tomllib`` into frozen dataclasses.

Every key has a default, so a file need only name what differs. Unknown keys and
values of the wrong type are errors that name the key and the file. Relative
paths resolve against the folder of the config file. The environment may
override paths and secrets only (see ``ENV_OVERRIDES``).

The key names under ``[model]``, ``[store]``, ``[checkpoints]``, ``[api]`` and
``[router]`` listed in ``docs/contracts.md`` are a contract with other programs: keep
them. Each back-end's ``[editors.<name>]`` section is its own config class
(``daemon/editors/<name>/config.py``), found through the back-end registry; this
module only composes the sections.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from daemon.config_fields import FieldError, fraction, non_negative, positive, require
from daemon.editors.hook.config import HookConfig
from daemon.editors.melo.config import MeloConfig
from daemon.editors.registry import BACKENDS, backend_names
from daemon.editors.registry import entry as backend_entry
from daemon.errors import ConfigError
from store.schema import Backend, RequestLimits

CONFIG_ENV = "EDITD_CONFIG"
DEFAULT_CONFIG_NAME = "config.toml"

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and where it runs.

    ``name_or_path`` is a Hugging Face folder or cached name, ``world:SIZE``
    / ``world:SIZE-ARCH`` for the embedded fact-world model (built on first use
    into ``world_cache``), or a ``.gguf`` file (imported once into ``import_cache``).
    """

    name_or_path: str = "world:small"
    device: Device = "auto"
    dtype: DType = "auto"
    threads: int = 1  # torch intra-op threads; 0 keeps torch's default
    trust_remote_code: bool = False
    world_cache: Path = Path("var/worlds")
    import_cache: Path = Path("var/models")

    def __post_init__(self) -> None:
        require(bool(self.name_or_path.strip()), "name_or_path", "must not be empty")
        non_negative(self, "threads")


@dataclass(frozen=True)
class StoreConfig:
    """The SQLite store and the limits applied to every incoming edit request."""

    path: Path = Path("var/editd.sqlite3")
    busy_timeout_s: float = 10.0
    max_prompt_chars: int = 2000
    max_target_chars: int = 1000
    max_list_items: int = 64

    def __post_init__(self) -> None:
        positive(self, "busy_timeout_s", "max_prompt_chars", "max_target_chars", "max_list_items")


@dataclass(frozen=True)
class RouterConfig:
    """How ``backend = "auto"`` edits are sent to a back-end."""

    default_backend: str = "auto"
    hook_max_target_tokens: int = 8
    escalate_to_melo: bool = True
    backends: tuple[str, ...] = ("hook", "melo")

    def __post_init__(self) -> None:
        positive(self, "hook_max_target_tokens")
        known = backend_names()
        shown = ", ".join(repr(str(n)) for n in known)
        require(
            self.default_backend == "auto" or self.default_backend in known,
            "default_backend",
            f"must be 'auto' or a registered back-end ({shown}); got {self.default_backend!r}",
        )
        require(bool(self.backends), "backends", "must name at least one back-end")
        for name in self.backends:
            require(name in known, "backends", f"unknown back-end {name!r} (registered: {shown})")
        require(len(set(self.backends)) == len(self.backends), "backends", "must not repeat a name")


@dataclass(frozen=True)
class EditorsConfig:
    """``[editors.<name>]``: one section per registered back-end, each its entry's config
    class (:mod:`daemon.editors.registry`); a section left out takes its defaults."""

    sections: Mapping[str, Any] = field(default_factory=lambda: default_sections())

    def section(self, name: str) -> Any:
        """The section of back-end ``name`` (its defaults if the file has none)."""
        if name in self.sections:
            return self.sections[name]
        return backend_entry(name).config_class()

    @property
    def melo(self) -> MeloConfig:
        """``[editors.melo]``."""
        return typing.cast(MeloConfig, self.section("melo"))

    @property
    def hook(self) -> HookConfig:
        """``[editors.hook]``."""
        return typing.cast(HookConfig, self.section("hook"))

    def with_sections(self, **sections: Any) -> EditorsConfig:
        """A copy with these sections replaced (by back-end name)."""
        for name, value in sections.items():
            wanted = backend_entry(name).config_class
            if not isinstance(value, wanted):
                raise TypeError(f"[editors.{name}] must be a {wanted.__name__}, got {value!r}")
        return EditorsConfig({**self.sections, **sections})


def default_sections() -> dict[str, Any]:
    """Every registered back-end's section at its defaults."""
    return {str(e.name): e.config_class() for e in BACKENDS.values()}


def _build_editors(table: Any, prefix: str) -> EditorsConfig:
    if not isinstance(table, dict):
        raise FieldError(prefix, f"expected a table, got {_describe(table)}")
    sections = default_sections()
    for name, value in table.items():
        if name not in BACKENDS:
            known = ", ".join(str(n) for n in backend_names())
            raise FieldError(f"{prefix}.{name}", f"unknown back-end (registered: {known})")
        sections[name] = _build(BACKENDS[Backend(name)].config_class, value, f"{prefix}.{name}")
    return EditorsConfig(sections)


@dataclass(frozen=True)
class WorkerConfig:
    """The worker that claims batches from the queue and applies them."""

    batch_size: int = 10
    max_wait_s: float = 2.0
    lease_s: float = 300.0
    max_attempts: int = 3
    backoff_base_s: float = 2.0
    backoff_max_s: float = 300.0
    poll_interval_s: float = 0.5
    verify: bool = True

    def __post_init__(self) -> None:
        positive(self, "batch_size", "lease_s", "max_attempts", "poll_interval_s")
        non_negative(self, "max_wait_s", "backoff_base_s")
        require(
            self.backoff_max_s >= self.backoff_base_s, "backoff_max_s", "must be >= backoff_base_s"
        )


@dataclass(frozen=True)
class SchedulerConfig:
    """Periodic jobs (apscheduler 3.x): the nightly run and lease housekeeping.

    ``nightly_enabled = false`` leaves the nightly run to ``editd nightly`` (the
    ``editd-nightly.timer`` unit); ``nightly_wait_s`` bounds how long a nightly run
    waits for its edits to be applied before it validates drift.
    """

    enabled: bool = True
    timezone: str = "UTC"
    nightly_time: str = "02:00"
    requeue_interval_s: float = 30.0
    nightly_enabled: bool = True
    nightly_wait_s: float = 21600.0

    def __post_init__(self) -> None:
        positive(self, "requeue_interval_s", "nightly_wait_s")
        parts = self.nightly_time.split(":")
        ok = len(parts) == 2 and all(p.isdigit() for p in parts)
        ok = ok and 0 <= int(parts[0]) <= 23 and 0 <= int(parts[1]) <= 59
        require(ok, "nightly_time", f"must be HH:MM in 24-hour time, got '{self.nightly_time}'")


@dataclass(frozen=True)
class CheckpointsConfig:
    """Atomic snapshots of the editors' state."""

    dir: Path = Path("var/checkpoints")
    every_edits: int = 100
    every_minutes: float = 30.0
    keep: int = 5

    def __post_init__(self) -> None:
        positive(self, "every_edits", "every_minutes", "keep")


@dataclass(frozen=True)
class DriftConfig:
    """Locality probes against the base model; rollback past the thresholds.
    An empty ``probes`` path means a probe set drawn from the fact world."""

    enabled: bool = True
    probes: str = ""
    interval_minutes: float = 60.0
    every_batches: int = 10
    min_top1_agreement: float = 0.97
    max_mean_kl: float = 0.05
    retention_sample: int = 50
    min_retention: float = 0.9

    def __post_init__(self) -> None:
        positive(self, "interval_minutes", "every_batches", "retention_sample")
        fraction(self, "min_top1_agreement", "min_retention")
        non_negative(self, "max_mean_kl")


@dataclass(frozen=True)
class HealthConfig:
    """When a back-end counts as degraded: its edits fail verification or escalate to
    another back-end too often over its last ``window_edits`` edits (no verdict before
    ``min_edits``). A degraded back-end shows in ``/v1/status``, in the
    ``editd_backend_degraded`` metric and in a ``backend_degraded`` warning event."""

    window_edits: int = 200
    min_edits: int = 20
    max_verification_failure_rate: float = 0.25
    max_escalation_rate: float = 0.25

    def __post_init__(self) -> None:
        positive(self, "window_edits", "min_edits")
        require(self.min_edits <= self.window_edits, "min_edits", "must be <= window_edits")
        fraction(self, "max_verification_failure_rate", "max_escalation_rate")


DEFAULT_SUBJECT_PROMPTS: tuple[str, ...] = (
    "{subject} is",
    "What do you know about {subject}?",
    "Here is some information about {subject}:",
    "{subject} was",
    "Facts about {subject}:",
    "Who or what is {subject}?",
)


@dataclass(frozen=True)
class KindsConfig:
    """What the request kinds other than ``fact`` mean in this daemon.

    - ``withheld_answer``: what a ``forget`` teaches the model to say instead, when the
      request has no ``target``.
    - ``subject_prompts``: for a ``forget`` with ``scope = "subject"``, prompts naming
      the subject (``{subject}`` is replaced) that the editor also trains on, besides
      the request's own prompt and rephrases, so that any prompt naming it is covered.
    - ``max_target_tokens``: the longest target (in tokens, after the prompt) any edit
      may teach; a longer one fails with the reason. Behaviour targets (a refusal, an
      identity answer) are free text and the reason this limit exists.
    - ``answer_tokens``: how many greedy tokens are read as the model's current answer
      to a ``forget``'s prompt when the request gives no ``target_true``.
    """

    withheld_answer: str = " [withheld]"
    subject_prompts: tuple[str, ...] = DEFAULT_SUBJECT_PROMPTS
    max_target_tokens: int = 64
    answer_tokens: int = 6

    def __post_init__(self) -> None:
        require(bool(self.withheld_answer.strip()), "withheld_answer", "must not be blank")
        positive(self, "max_target_tokens", "answer_tokens")
        for template in self.subject_prompts:
            require(
                "{subject}" in template and template.count("{") == 1,
                "subject_prompts",
                f"each must contain '{{subject}}' and no other braces, got {template!r}",
            )


MIN_TOKEN_CHARS = 16
MAX_CONCURRENT_COMPLETIONS = 32
"""Completions run in the HTTP server's thread pool (40 threads); 8 stay for the rest."""


def _host_name(name: str) -> bool:
    """A host name or an address (no port, no brackets), or ``"*"``."""
    if name == "*" or re.fullmatch(r"[A-Za-z0-9._-]+", name):
        return True
    try:
        return ipaddress.ip_address(name).version == 6
    except ValueError:
        return False


@dataclass(frozen=True)
class ApiConfig:
    """The HTTP API. ``token`` may come from the environment (EDITD_API_TOKEN).

    With a token set, every route but ``GET /healthz`` needs it, except the reads
    (``GET``: edits, feeds, status, ``/metrics``, ``/openapi.json``) when
    ``public_reads`` is true and ``POST /v1/completions`` when
    ``completions_require_token`` is false. At most ``max_concurrent_completions``
    completion requests run at once (more get 429). The ``Host`` header must name
    localhost, 127.0.0.1, ::1, the bind address, the address the connection came in
    on, or one of ``allowed_hosts`` (``"*"``: any). Connections: at most
    ``max_connections`` (a new one closes the oldest idle one; requests past it get
    503), request headers within ``request_header_timeout_s`` of the connection (or
    of the previous response), idle keep-alive connections closed after
    ``keep_alive_timeout_s``, request line plus headers at most ``max_header_bytes``.

    ``served_model_name`` is the model id of the OpenAI-compatible routes (``GET
    /v1/models``; a completion or chat request naming another model gets 404); empty:
    the name of ``[model] name_or_path`` (a folder's or file's own name, else the value
    itself). ``chat_template`` renders ``POST /v1/chat/completions`` messages for a
    model without a chat template of its own (or instead of it): a Jinja template
    (text holding ``{{`` or ``{%``), or the path of a file holding one (relative to the
    config file's folder); empty: the model's own.
    """

    host: str = "127.0.0.1"
    port: int = 8765
    token: str = ""
    max_request_bytes: int = 1 << 20
    max_edits_per_request: int = 1000
    max_prompts_per_completion: int = 32
    max_tokens_limit: int = 256
    max_concurrent_completions: int = 4
    completions_require_token: bool = True
    public_reads: bool = False
    allowed_hosts: tuple[str, ...] = ()
    max_connections: int = 100
    request_header_timeout_s: float = 10.0
    keep_alive_timeout_s: int = 5
    max_header_bytes: int = 16384
    served_model_name: str = ""
    chat_template: str = ""

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, "port", "must be between 0 and 65535")
        require(bool(self.host.strip()), "host", "must not be empty")
        require(
            not self.token or len(self.token) >= MIN_TOKEN_CHARS,
            "token",
            f"must be at least {MIN_TOKEN_CHARS} characters, got {len(self.token)} (make one "
            "with: python -c 'import secrets; print(secrets.token_urlsafe(32))')",
        )
        require(
            not self.token or re.fullmatch(r"[\x21-\x7e]+", self.token) is not None,
            "token",
            "must be printable ASCII without spaces",
        )
        positive(self, "max_request_bytes", "max_edits_per_request")
        positive(self, "max_prompts_per_completion", "max_tokens_limit")
        positive(self, "max_connections", "request_header_timeout_s", "keep_alive_timeout_s")
        positive(self, "max_header_bytes")
        require(
            len(self.served_model_name) <= 200
            and not any(c.isspace() or not c.isprintable() for c in self.served_model_name),
            "served_model_name",
            "must be at most 200 printable characters without whitespace",
        )
        require(
            0 < self.max_concurrent_completions <= MAX_CONCURRENT_COMPLETIONS,
            "max_concurrent_completions",
            f"must be between 1 and {MAX_CONCURRENT_COMPLETIONS} (the rest of the HTTP "
            "thread pool serves the other routes)",
        )
        for name in self.allowed_hosts:
            require(
                _host_name(name),
                "allowed_hosts",
                f'must hold host names or addresses without a port (or "*"), got {name!r}',
            )


@dataclass(frozen=True)
class PatternRule:
    """One rule of the pattern extractor (``[[feeds.patterns]]``).

    ``pattern`` is a regular expression searched in the sentences of an item's title
    and then of its summary (each at most 1,000 characters, within the first 20,000);
    it must name the groups ``subject`` and ``object``. ``prompt`` and
    ``target`` are templates over the named groups, e.g. prompt ``"The chief
    executive of {subject} is"`` and target ``" {object}"``.
    """

    relation: str = ""
    pattern: str = ""
    prompt: str = ""
    target: str = " {object}"
    ignore_case: bool = True

    def __post_init__(self) -> None:
        require(
            bool(re.fullmatch(r"[a-z][a-z0-9_]*", self.relation)), "relation", "must be snake_case"
        )
        try:
            groups = re.compile(self.pattern).groupindex
        except re.error as exc:
            raise FieldError("pattern", f"is not a valid regular expression: {exc}") from None
        require(
            {"subject", "object"} <= set(groups),
            "pattern",
            "must name the groups 'subject' and 'object'",
        )
        require("{subject}" in self.prompt, "prompt", "must contain {subject}")
        require(bool(self.target.strip()), "target", "must not be empty")


@dataclass(frozen=True)
class FeedsConfig:
    """Feed polling (feeds themselves are added with ``editd feeds add``) and the spool."""

    enabled: bool = True
    default_interval_s: float = 900.0
    timeout_s: float = 10.0
    max_bytes: int = 5 << 20
    user_agent: str = "editd/0.1"
    spool_dir: Path = Path("var/spool")
    spool_max_file_bytes: int = 256 << 20
    pattern_extractor: bool = False
    patterns: tuple[PatternRule, ...] = ()
    tick_s: float = 30.0
    retries: int = 2
    backoff_s: float = 1.0
    allow_hosts: tuple[str, ...] = ()  # non-public hosts feeds may be fetched from

    def __post_init__(self) -> None:
        positive(self, "default_interval_s", "timeout_s", "max_bytes", "spool_max_file_bytes")
        positive(self, "tick_s", "backoff_s")
        require(self.retries >= 0, "retries", "must be >= 0")
        for entry in self.allow_hosts:
            require(
                _feed_host_or_network(entry),
                "allow_hosts",
                f"must hold host names, IP addresses or CIDR networks, got {entry!r}",
            )


def _feed_host_or_network(entry: str) -> bool:
    """A host name (``feeds.lan``), an IP address or a CIDR network (``10.0.0.0/8``)."""
    try:
        ipaddress.ip_network(entry.strip("[]"), strict=False)
    except ValueError:
        return re.fullmatch(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?", entry) is not None
    return True


@dataclass(frozen=True)
class LogConfig:
    """Log level and rendering (``auto``: console on a terminal, JSON lines otherwise)."""

    level: LogLevel = "info"
    format: LogFormat = "auto"


@dataclass(frozen=True)
class Config:
    """The whole configuration; ``source`` is the file it came from (None: defaults)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    kinds: KindsConfig = field(default_factory=KindsConfig)
    editors: EditorsConfig = field(default_factory=EditorsConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    checkpoints: CheckpointsConfig = field(default_factory=CheckpointsConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    feeds: FeedsConfig = field(default_factory=FeedsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: Path | None = None


def cache_dir(cfg: Config) -> Path:
    """Where editors keep what they compute once per model (key statistics, locate
    results): the folder beside the store (``var/`` by default)."""
    return cfg.store.path.parent


def request_limits(cfg: Config) -> RequestLimits:
    """The intake limits the config asks for (applied to edits from every source)."""
    return RequestLimits(
        max_prompt_chars=cfg.store.max_prompt_chars,
        max_target_chars=cfg.store.max_target_chars,
        max_list_items=cfg.store.max_list_items,
        backends=tuple(str(n) for n in backend_names()),
        withheld_answer=cfg.kinds.withheld_answer,
    )


# Environment variables that may override a value: paths and secrets only.
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "EDITD_API_TOKEN": ("api", "token"),
    "EDITD_STORE_PATH": ("store", "path"),
    "EDITD_CHECKPOINTS_DIR": ("checkpoints", "dir"),
    "EDITD_MODEL_PATH": ("model", "name_or_path"),
    "EDITD_SPOOL_DIR": ("feeds", "spool_dir"),
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        args = typing.get_args(tp)
        return repr(args[0]) if len(args) == 1 else "one of " + ", ".join(map(repr, args))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        Path: "a path (string)",
    }
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _describe(value: Any) -> str:
    kind = {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "list",
        dict: "table",
    }.get(type(value), type(value).__name__)
    shown = repr(value)
    return f"{kind} {shown[:40] + '...' if len(shown) > 40 else shown}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (e.g. list → tuple)."""
    origin = typing.get_origin(tp)
    ok: bool
    if origin in (typing.Union, types.UnionType):  # the first alternative that fits
        for alternative in typing.get_args(tp):
            try:
                return _coerce(value, alternative, key)
            except FieldError:
                continue
        raise FieldError(key, f"expected {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        ok = isinstance(value, str) and value in typing.get_args(tp)
    elif origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list):
            raise FieldError(key, f"expected {_type_name(tp)}, got {_describe(value)}")
        if dataclasses.is_dataclass(item_tp):
            rule_tp = typing.cast(type[Any], item_tp)
            return tuple(_build(rule_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
        return tuple(_coerce(v, item_tp, key) for v in value)
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif tp is Path:
        ok = isinstance(value, str) and bool(value.strip())
        value = Path(value) if ok else value
    else:
        raise TypeError(f"unsupported annotation for {key}: {tp}")
    if not ok:
        raise FieldError(key, f"expected {_type_name(tp)}, got {_describe(value)}")
    return value


def _build(cls: type[Any], table: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a TOML table, naming keys as ``prefix.key``."""
    if not isinstance(table, dict):
        raise FieldError(prefix, f"expected a table, got {_describe(table)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs: dict[str, Any] = {}
    for name, value in table.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in known:
            allowed = ", ".join(sorted(known))
            raise FieldError(key, f"unknown key (allowed here: {allowed})")
        tp = hints[name]
        if tp is EditorsConfig:
            kwargs[name] = _build_editors(value, key)
        elif dataclasses.is_dataclass(tp):
            kwargs[name] = _build(typing.cast(type[Any], tp), value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise FieldError(f"{prefix}.{e.key}" if prefix else e.key, str(e)) from None


def _resolve_paths(cfg: Config, base: Path) -> Config:
    def rel(p: Path) -> Path:
        return p if p.is_absolute() else (base / p)

    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(
            cfg.model,
            world_cache=rel(cfg.model.world_cache),
            import_cache=rel(cfg.model.import_cache),
        ),
        drift=dataclasses.replace(
            cfg.drift, probes=str(rel(Path(cfg.drift.probes))) if cfg.drift.probes else ""
        ),
        store=dataclasses.replace(cfg.store, path=rel(cfg.store.path)),
        checkpoints=dataclasses.replace(cfg.checkpoints, dir=rel(cfg.checkpoints.dir)),
        feeds=dataclasses.replace(cfg.feeds, spool_dir=rel(cfg.feeds.spool_dir)),
        api=dataclasses.replace(
            cfg.api,
            chat_template=str(rel(Path(cfg.api.chat_template)))
            if chat_template_is_path(cfg.api.chat_template)
            else cfg.api.chat_template,
        ),
    )


def chat_template_is_path(value: str) -> bool:
    """Whether an ``[api] chat_template`` value names a file (not empty, no Jinja markup)."""
    return bool(value.strip()) and "{{" not in value and "{%" not in value


def chat_template_text(api: ApiConfig) -> str | None:
    """The chat template ``[api] chat_template`` gives (read from its file when it names
    one); None when it is empty. Raises ``ConfigError`` for a file that cannot be read."""
    value = api.chat_template
    if not chat_template_is_path(value):
        return value or None
    try:
        text = Path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read the chat template file: {exc}", key="api.chat_template"
        ) from exc
    if not text.strip():
        raise ConfigError(f"the chat template file {value} is empty", key="api.chat_template")
    return text


def _apply_env(data: dict[str, Any], env: typing.Mapping[str, str]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for var, (section, key) in ENV_OVERRIDES.items():
        value = env.get(var)
        if value:
            table = out.setdefault(section, {})
            if isinstance(table, dict):
                table[key] = value
    return out


def parse_config(
    data: dict[str, Any], *, source: Path | None = None, env: typing.Mapping[str, str] | None = None
) -> Config:
    """Validate a parsed TOML document (plus environment overrides) into a ``Config``."""
    merged = _apply_env(data, os.environ if env is None else env)
    try:
        cfg: Config = _build(Config, merged, "")
    except FieldError as e:
        raise ConfigError(str(e), path=source, key=e.key) from None
    base = source.parent if source is not None else Path.cwd()
    return dataclasses.replace(_resolve_paths(cfg, base.resolve()), source=source)


def config_path(explicit: str | Path | None, env: typing.Mapping[str, str] | None = None) -> Path:
    """The config file to read: ``--config``, else ``$EDITD_CONFIG``, else ``./config.toml``."""
    environ = os.environ if env is None else env
    if explicit:
        return Path(explicit)
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    return Path(DEFAULT_CONFIG_NAME)


def load_config(
    path: str | Path | None = None,
    *,
    env: typing.Mapping[str, str] | None = None,
    missing_ok: bool | None = None,
) -> Config:
    """Read and validate the config file.

    A file named explicitly (argument or ``EDITD_CONFIG``) must exist; the
    implicit ``./config.toml`` may be absent, and then the defaults apply.
    """
    environ = os.environ if env is None else env
    chosen = config_path(path, environ)
    implicit = not path and not environ.get(CONFIG_ENV)
    allow_missing = implicit if missing_ok is None else missing_ok
    try:
        raw = chosen.read_bytes()
    except FileNotFoundError:
        if allow_missing:
            return parse_config({}, source=None, env=environ)
        raise ConfigError("config file not found", path=chosen) from None
    except OSError as e:
        raise ConfigError(f"cannot read config file ({e.strerror})", path=chosen) from e
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"not valid UTF-8 at byte {e.start}", path=chosen) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML: {e}", path=chosen) from None
    return parse_config(data, source=chosen.resolve(), env=environ)


def config_as_dict(cfg: Config) -> dict[str, Any]:
    """A plain, TOML/JSON-friendly dictionary of the effective configuration."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    editors = {name: dataclasses.asdict(section) for name, section in cfg.editors.sections.items()}
    out = plain({**dataclasses.asdict(cfg), "editors": editors})
    out.pop("source", None)
    if out["api"]["token"]:
        out["api"]["token"] = "***"
    return typing.cast(dict[str, Any], out)
