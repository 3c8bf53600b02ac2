"""The checks config sections run in ``__post_init__``, and the error they raise.

Every ``[section]`` of ``config.toml`` is a frozen dataclass that validates itself with
these; :func:`daemon.config.parse_config` turns a :class:`FieldError` into a
``ConfigError`` naming the file and the full key. Back-ends' sections
(``daemon/editors/<name>/config.py``) use the same checks.
"""

from __future__ import annotations


class FieldError(ValueError):
    """Raised inside ``__post_init__``; the loader adds the file and section."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def require(ok: bool, key: str, message: str) -> None:
    """Raise :class:`FieldError` for ``key`` unless ``ok``."""
    if not ok:
        raise FieldError(key, message)


def positive(cfg: object, *names: str) -> None:
    """Each named field of ``cfg`` is > 0."""
    for name in names:
        require(getattr(cfg, name) > 0, name, "must be > 0")


def non_negative(cfg: object, *names: str) -> None:
    """Each named field of ``cfg`` is >= 0."""
    for name in names:
        require(getattr(cfg, name) >= 0, name, "must be >= 0")


def fraction(cfg: object, *names: str) -> None:
    """Each named field of ``cfg`` is in [0, 1]."""
    for name in names:
        require(0.0 <= getattr(cfg, name) <= 1.0, name, "must be between 0 and 1")
