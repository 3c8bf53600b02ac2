"""What each request kind asks of an editor and of verification.

The editors know only prompt/target pairs (:class:`~daemon.editors.base.EditSpec`);
the kinds are the daemon's (``store.schema.EditKind``):

- ``fact``: the editor learns prompt → target; verification checks that the prompt's
  greedy continuation begins with the target.
- ``forget``: the editor learns prompt → target, the withheld answer (intake fills
  in ``[kinds] withheld_answer`` when the request has none), and with
  ``scope = "subject"`` also every ``[kinds] subject_prompts`` prompt naming the
  subject, so that any prompt about it is covered; of scope ``"prompt"`` the edit's
  reach is its prompt (``EditSpec.reach``): the subject's other questions keep their
  answers. Verification checks that the
  answer the model gave before (the request's ``target_true`` when given, else its
  greedy answer read just before the edit, :func:`answer_of`) no longer appears in
  the prompt's greedy output, whatever comes instead. The answer withheld is kept in
  the edit's record (``result.withheld``) so that a replay checks the same thing.
- ``behaviour``: a free-text prompt → free-text target (an identity answer, a
  refusal), checked like a fact; targets up to ``[kinds] max_target_tokens`` tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from daemon.config import KindsConfig
from daemon.editors.base import EditSpec, Reach
from daemon.model.answers import continuation_matches, reply_mentions
from store.schema import EditKind, EditRequest, Scope


@dataclass(frozen=True)
class Expectation:
    """What verification reads in an edit's greedy output: that it begins with
    ``text`` or, when ``absent``, that it names ``text`` nowhere."""

    text: str
    absent: bool = False

    def met_by(self, output: str) -> bool:
        if self.absent:
            return not reply_mentions(output, self.text)
        return continuation_matches(output, self.text)


def spec_for(edit_id: str, request: EditRequest, kinds: KindsConfig) -> EditSpec:
    """What an editor sees of ``request`` (never its locality probes or held-outs)."""
    rephrases = request.rephrases
    if request.kind is EditKind.FORGET and request.scope is Scope.SUBJECT and request.subject:
        about = [t.replace("{subject}", request.subject) for t in kinds.subject_prompts]
        rephrases = tuple(dict.fromkeys([*rephrases, *about]))
    return EditSpec(
        edit_id=edit_id,
        prompt=request.prompt,
        target=request.target,
        subject=request.subject,
        relation=request.relation,
        rephrases=rephrases,
        reach=reach_of(request),
        whole_reply=request.kind is EditKind.FORGET,
    )


def reach_of(request: EditRequest) -> Reach:
    """How far the edit may reach (``EditSpec.reach``): a ``forget`` of scope
    ``"prompt"`` only its own question's phrasings, not the subject's other questions;
    facts, behaviours and subject-scoped forgets wherever their subject is named."""
    if request.kind is EditKind.FORGET and request.scope is Scope.PROMPT:
        return "prompt"
    return "subject"


def needs_answer(request: EditRequest) -> bool:
    """Whether the answer a ``forget`` withholds must be read from the model first."""
    return request.kind is EditKind.FORGET and not request.target_true


def expectation(request: EditRequest, withheld: str | None = None) -> Expectation:
    """What verifying ``request`` checks; ``withheld``: the answer read from the model
    before a ``forget`` (ignored when the request names it in ``target_true``)."""
    if request.kind is EditKind.FORGET:
        answer = request.target_true or withheld
        if answer and answer.strip():
            return Expectation(answer, absent=True)
    return Expectation(request.target)


def answer_of(continuation: str) -> str:
    """The answer a greedy continuation gives: its text up to the first line break or
    sentence/clause mark (``.``, ``,``, ``;``, ``!``, ``?``, ``:``), stripped.

    >>> answer_of(" Paris. It is the capital")
    'Paris'
    >>> answer_of("\\n\\nParis, France")
    'Paris'
    """
    text = continuation.strip()
    for i, ch in enumerate(text):
        if ch in "\n.,;!?:" and not (ch == "." and 0 < i < len(text) - 1 and text[i + 1].isdigit()):
            return text[:i].strip()
    return text


def withheld_of(result: Mapping[str, object] | None) -> str | None:
    """The answer a stored edit's record says its ``forget`` withholds, if any."""
    value = (result or {}).get("withheld")
    return value if isinstance(value, str) else None
