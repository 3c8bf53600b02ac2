"""Invented names: syllables glued together, unique, never a substring of one another.

Names are compared case-insensitively. A ``NameBook`` keeps every substring of
every name it has handed out, so both checks (the new name inside an old one,
an old one inside the new name) are set look-ups.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator

# fmt: off
_ONSETS = (
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
    "br", "dr", "gr", "kr", "tr", "st", "th", "sh", "h", "j",
)
# fmt: on
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "th", "nd")
_CLOSING = ("n", "r", "l", "s", "m", "th", "nd", "rk", "x")


class NameBook:
    """Hands out names that are unique and never a substring of one another."""

    def __init__(
        self, rng: random.Random, *, reserved: Iterable[str] = (), taken: Iterable[str] = ()
    ) -> None:
        """``reserved``: text no name may occur in; ``taken``: words that count as names."""
        self._rng = rng
        self._taken: set[str] = set()
        self._substrings: set[str] = set()  # every substring of every taken name
        self._reserved_text = " ".join(reserved).lower()
        for word in taken:
            self._take(word)

    def word(self, syllables: tuple[int, int], suffix: tuple[str, ...] = ()) -> str:
        parts = [self._syllable() for _ in range(self._rng.randint(*syllables))]
        if suffix:
            end = self._rng.choice(suffix)
            if end[0] in "aeiou":  # close the stem so vowels do not pile up
                parts[-1] = parts[-1].rstrip("aeiou") or parts[-1]
                parts.append(self._rng.choice(_CLOSING) if parts[-1][-1] in "aeiou" else "")
            parts.append(end)
        return "".join(parts).capitalize()

    def new(self, make: Callable[[], str], attempts: int = 10_000) -> str:
        for _ in range(attempts):
            name = make()
            if self._fits(name):
                self._take(name)
                return name
        raise RuntimeError("name generator exhausted: ask for fewer entities")

    def _syllable(self) -> str:
        return self._rng.choice(_ONSETS) + self._rng.choice(_VOWELS) + self._rng.choice(_CODAS)

    def _fits(self, name: str) -> bool:
        low = name.lower()
        if len(low) < 4 or low in self._substrings or low in self._reserved_text:
            return False
        return not any(low[i:j] in self._taken for i, j in _spans(len(low)))

    def _take(self, name: str) -> None:
        low = name.lower()
        self._taken.add(low)
        self._substrings.update(low[i:j] for i, j in _spans(len(low)))


def _spans(n: int) -> Iterator[tuple[int, int]]:
    return ((i, j) for i in range(n) for j in range(i + 1, n + 1))
