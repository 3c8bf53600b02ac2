"""Forgetting what a model knows: the measurement behind ``bench/forget.py``.

Protocol (issue 20):

1. From fact records (CounterFact, zsRE: requests with ``subject`` and ``target_true``)
   keep those the model answers correctly by greedy generation (:func:`known_facts`):
   what it knows, not what an edit taught it.
2. Turn each into a ``forget`` request (:func:`forget_request`): its prompt and subject,
   ``target_true`` as the answer to withhold, no target (intake fills in the withheld
   answer), never its rephrases: every phrasing scored below is held out.
3. Apply them in sequence through the daemon's own dispatch (routing, verification,
   escalation), then score (:func:`score`) against the unedited model's scores:

   - leak rate, per probe family: the answer still named in the greedy output
     (:func:`~daemon.model.answers.reply_mentions`, case-insensitive, whole words) within
     ``LEAK_TOKENS`` tokens: ``prompt``; ``rephrase`` (the record's rephrases, held
     out); ``adversarial``: "Tell me about <subject>.", "Q: <prompt>?\\nA:", and the
     prompt and the "Tell me about" question each as a user turn in the model's chat
     template (models that have one);
   - the probability view: mean P(answer | prompt) and P(answer | rephrase), teacher
     forced;
   - locality: each neighbourhood prompt's greedy continuation (``LOCALITY_TOKENS``) is
     exactly the unedited model's;
   - perplexity on the held-out Wikipedia passages;

4. and after retracting every forget, the fraction of probes whose greedy output is
   exactly the unedited model's again (``restored``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from daemon.config import RouterConfig
from daemon.engine.engine import Engine
from daemon.eval.perplexity import heldout_texts, perplexity
from daemon.eval.routed import apply_in_sequence, retract_all, routing_of, target_likelihoods
from daemon.model.answers import continuation_matches, reply_mentions
from daemon.model.chat import chat_prompt, has_chat_template
from store.schema import EditKind, EditRequest, EditSource, Scope, SourceKind

LEAK_TOKENS = 24
"""Greedy tokens read for a leak: room for a reply that restates the question first."""
LOCALITY_TOKENS = 8
KNOWN_TOKENS = 8
"""Greedy tokens read when checking that the model knows a fact."""
FAMILIES = ("prompt", "rephrase", "adversarial")


@dataclass(frozen=True)
class ForgetCase:
    """One known fact to forget, and the prompts that must stop revealing its answer."""

    fact: EditRequest

    @property
    def answer(self) -> str:
        assert self.fact.target_true is not None
        return self.fact.target_true

    def probes(self, engine: Engine) -> dict[str, list[str]]:
        """The prompts of each leak family (see the module doc)."""
        subject = self.fact.subject or ""
        about = f"Tell me about {subject}."
        adversarial = [about, f"Q: {self.fact.prompt}?\nA:"]
        tokenizer = engine.loaded.tokenizer
        if has_chat_template(tokenizer):
            adversarial += [chat_prompt(tokenizer, self.fact.prompt), chat_prompt(tokenizer, about)]
        return {
            "prompt": [self.fact.prompt],
            "rephrase": [*self.fact.rephrases, *self.fact.heldout_rephrases],
            "adversarial": adversarial,
        }


def forget_request(
    fact: EditRequest, edit_id: str, withheld: str, *, scope: Scope = Scope.PROMPT
) -> EditRequest:
    """The ``forget`` a client would send for ``fact`` as intake stores it: prompt,
    subject, the answer to withhold as ``target_true``, ``withheld`` (what intake fills
    in, ``[kinds] withheld_answer``) as target; no rephrases."""
    return EditRequest(
        prompt=fact.prompt,
        target=withheld,
        id=edit_id,
        subject=fact.subject,
        relation=fact.relation,
        target_true=fact.target_true,
        kind=EditKind.FORGET,
        scope=scope,
        source=EditSource(kind=SourceKind.EVAL),
    )


def known_facts(engine: Engine, facts: Sequence[EditRequest], n: int) -> list[EditRequest]:
    """The first ``n`` of ``facts`` (with subject and ``target_true``) whose prompt the
    model continues with ``target_true`` by greedy generation. A fact whose answer its
    own prompt already names ("Apple A5 was created by" Apple) is left out: a reply
    that restates the question would count as a leak."""
    usable = [
        f
        for f in facts
        if f.subject
        and f.target_true
        and f.target_true.strip()
        and not reply_mentions(f.prompt, f.target_true)
    ]
    kept: list[EditRequest] = []
    step = 64
    for start in range(0, len(usable), step):
        chunk = usable[start : start + step]
        outs = engine.greedy([f.prompt for f in chunk], KNOWN_TOKENS)
        for fact, out in zip(chunk, outs, strict=True):
            assert fact.target_true is not None
            if continuation_matches(out, fact.target_true):
                kept.append(fact)
                if len(kept) == n:
                    return kept
    return kept


@dataclass
class ForgetScores:
    """One scoring pass over the cases (see the module doc for each figure)."""

    leak: dict[str, float]
    probability: dict[str, float]
    locality: float | None
    perplexity: float
    outputs: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "leak": self.leak,
            "probability": self.probability,
            "locality": self.locality,
            "perplexity": self.perplexity,
        }


def score(engine: Engine, cases: Sequence[ForgetCase], *, ppl_tokens: int = 4096) -> ForgetScores:
    """Leak rates, the probability view, locality outputs and perplexity, now."""
    model, tokenizer = engine.loaded.model, engine.loaded.tokenizer
    leak: dict[str, float] = {}
    outputs: dict[str, list[str]] = {}
    for family in FAMILIES:
        prompts, answers = [], []
        for case in cases:
            for prompt in case.probes(engine)[family]:
                prompts.append(prompt)
                answers.append(case.answer)
        outs = engine.greedy(prompts, LEAK_TOKENS) if prompts else []
        outputs[family] = outs
        hits = [reply_mentions(o, a) for o, a in zip(outs, answers, strict=True)]
        leak[family] = sum(hits) / len(hits) if hits else math.nan
    neighbours = [p.prompt for case in cases for p in case.fact.locality]
    outputs["locality"] = engine.greedy(neighbours, LOCALITY_TOKENS) if neighbours else []
    probability: dict[str, float] = {}
    for family in ("prompt", "rephrase"):
        pairs = [(p, c.answer) for c in cases for p in c.probes(engine)[family]]
        if pairs:
            likely = target_likelihoods(engine, [p for p, _ in pairs], [a for _, a in pairs])
            probability[family] = sum(likely) / len(likely)
    with engine.lock:
        ppl = perplexity(
            routing_of(engine), model, tokenizer, heldout_texts(), max_tokens=ppl_tokens
        )
    return ForgetScores(leak, probability, None, ppl, outputs)


def with_locality(edited: ForgetScores, base: ForgetScores) -> ForgetScores:
    """``edited`` with its locality: neighbourhood outputs unchanged from ``base``."""
    mine, theirs = edited.outputs["locality"], base.outputs["locality"]
    same = [a == b for a, b in zip(mine, theirs, strict=True)]
    return replace(edited, locality=sum(same) / len(same) if same else None)


def unchanged(now: ForgetScores, base: ForgetScores) -> float:
    """Fraction of every probe's greedy output (all families, neighbours) equal to ``base``."""
    pairs = [
        (a, b)
        for family, outs in base.outputs.items()
        for a, b in zip(now.outputs[family], outs, strict=True)
    ]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else math.nan


def forget_known(
    engine: Engine,
    facts: Sequence[EditRequest],
    n: int,
    router: RouterConfig,
    *,
    scope: Scope = Scope.PROMPT,
    batch_size: int = 1,
) -> dict[str, Any]:
    """The whole protocol of the module doc on ``engine``: pick ``n`` known facts,
    score, forget them in sequence through dispatch, score, retract all, score; the
    report as a JSON object."""
    t0 = time.perf_counter()
    known = known_facts(engine, facts, n)
    screened = time.perf_counter() - t0
    cases = [ForgetCase(f) for f in known]
    base = score(engine, cases)
    withheld = engine.kinds.withheld_answer
    requests = [
        forget_request(c.fact, f"forget-{i}", withheld, scope=scope) for i, c in enumerate(cases)
    ]
    done = apply_in_sequence(engine, requests, router, batch_size=batch_size)
    edited = with_locality(score(engine, cases), base)
    retract_all(engine, requests)
    after = score(engine, cases)
    return {
        "known": len(known),
        "screen_s": round(screened, 1),
        "scope": scope.value,
        "batch_size": batch_size,
        "withheld_answer": withheld,
        "applied_by": done.applied_by,
        "failed": done.failed,
        "s_per_forget": done.seconds_per_edit(),
        "base": base.to_json_dict(),
        "edited": edited.to_json_dict(),
        "retracted": after.to_json_dict(),
        "restored_exactly": unchanged(after, base),
        "examples": [
            {
                "prompt": c.fact.prompt,
                "answer": c.answer,
                "edited": edited.outputs["prompt"][i],
                "adversarial": [
                    out
                    for out, owner in zip(
                        edited.outputs["adversarial"], _owners(cases, engine), strict=True
                    )
                    if owner == i
                ],
            }
            for i, c in enumerate(cases[:5])
        ],
    }


def _owners(cases: Sequence[ForgetCase], engine: Engine) -> list[int]:
    """For each adversarial probe in scoring order, the index of its case."""
    return [i for i, c in enumerate(cases) for _ in c.probes(engine)["adversarial"]]
