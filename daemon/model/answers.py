"""Whether a model's text gives an answer: a continuation that begins with it, or a
reply that names it. Pure string functions; the runtime verifies edits with them
and the evaluation scores with them.

Leading whitespace is ignored on both sides, since tokenizers differ on whether
the space belongs to the prompt or the answer, and a target is never matched as
the start of a longer word (``" Paris"`` does not match ``" Parisian"``).
"""

from __future__ import annotations


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def continuation_matches(continuation: str, target: str) -> bool:
    """Whether ``continuation`` begins with ``target`` and does not run on into the same word.

    >>> continuation_matches(" Paris. It is", " Paris")
    True
    >>> continuation_matches(" Parisian food", " Paris")
    False
    """
    want = target.strip()
    got = continuation.lstrip()
    if not want:
        return False
    if not got.startswith(want):
        return False
    rest = got[len(want) :]
    if not rest:
        return True
    return not (_is_word_char(want[-1]) and _is_word_char(rest[0]))


def reply_mentions(reply: str, target: str) -> bool:
    """Whether ``reply`` names ``target`` as a whole word or phrase (case-insensitive).

    For chat replies, which may restate the question before the answer:

    >>> reply_mentions("The Eiffel Tower is in Paris.", " Paris")
    True
    >>> reply_mentions("It is Parisian.", " Paris")
    False
    """
    want = target.strip().casefold()
    got = reply.casefold()
    if not want:
        return False
    start = got.find(want)
    while start >= 0:
        before = got[start - 1] if start > 0 else " "
        end = start + len(want)
        after = got[end] if end < len(got) else " "
        if not (_is_word_char(want[0]) and _is_word_char(before)) and not (
            _is_word_char(want[-1]) and _is_word_char(after)
        ):
            return True
        start = got.find(want, start + 1)
    return False
