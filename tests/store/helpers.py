"""Helpers shared by the store tests."""

from __future__ import annotations

from hypothesis import strategies as st


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def request(n: int = 0, **extra: object) -> dict[str, object]:
    """A valid edit request; ``n`` makes its content unique."""
    return {"prompt": f"The CEO of Acme{n} is", "target": f" Jane Roe {n}", **extra}


json_values = st.recursive(  # JSON-like values of any shape
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
