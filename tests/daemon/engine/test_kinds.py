"""What each request kind asks of an editor and of verification (pure parts)."""

from __future__ import annotations

import pytest

from daemon.config import KindsConfig
from daemon.config_fields import FieldError
from daemon.engine.kinds import Expectation, answer_of, expectation, spec_for, withheld_of
from store.records import parse_edit_request

KINDS = KindsConfig(subject_prompts=("Tell me of {subject}:", "{subject} is"))


def test_a_fact_spec_is_the_request() -> None:
    request = parse_edit_request(
        {"prompt": "Acme's CEO is", "target": " Jane", "subject": "Acme", "rephrases": ["x"]}
    )
    spec = spec_for("e1", request, KINDS)
    assert (spec.edit_id, spec.prompt, spec.target, spec.subject) == (
        "e1",
        "Acme's CEO is",
        " Jane",
        "Acme",
    )
    assert spec.rephrases == ("x",)
    assert spec.reach == "subject"
    assert expectation(request) == Expectation(" Jane")


def test_a_subject_scoped_forget_trains_on_every_subject_prompt() -> None:
    request = parse_edit_request(
        {
            "kind": "forget",
            "scope": "subject",
            "prompt": "Jane Roe lives at",
            "subject": "Jane Roe",
            "rephrases": ["Jane Roe is"],
        }
    )
    spec = spec_for("g", request, KINDS)
    assert spec.target == " [withheld]"
    assert spec.rephrases == ("Jane Roe is", "Tell me of Jane Roe:")  # no duplicates
    assert spec.reach == "subject"
    prompt_scoped = spec_for(
        "g", parse_edit_request({**request.to_json_dict(), "scope": None}), KINDS
    )
    assert prompt_scoped.rephrases == ("Jane Roe is",)
    assert prompt_scoped.reach == "prompt"  # the person's other questions are not reached


def test_a_forget_checks_that_the_answer_is_gone() -> None:
    forget = parse_edit_request(
        {"kind": "forget", "prompt": "Jane Roe lives at", "subject": "Jane Roe"}
    )
    want = expectation(forget, withheld=" 12 Elm Street")
    assert want == Expectation(" 12 Elm Street", absent=True)
    assert want.met_by(" [withheld]") and want.met_by(" a house")
    assert not want.met_by(" [withheld], at 12 elm street")  # named anywhere, any case
    # the request's own target_true wins over what the model said
    named = parse_edit_request({**forget.to_json_dict(), "target_true": " Oak Road"})
    assert expectation(named, withheld=" 12 Elm Street").text == " Oak Road"
    # nothing known to withhold: the withheld answer must appear, as for a fact
    assert expectation(forget, withheld=None) == Expectation(" [withheld]")


@pytest.mark.parametrize(
    ("continuation", "answer"),
    [
        (" Paris. It is", "Paris"),
        ("\n\nParis, France", "Paris"),
        (" 3.5 million people.", "3.5 million people"),
        (" the French language", "the French language"),
        ("   ", ""),
    ],
)
def test_answer_of_reads_the_first_clause(continuation: str, answer: str) -> None:
    assert answer_of(continuation) == answer


def test_withheld_of_reads_the_record() -> None:
    assert withheld_of({"withheld": " Paris"}) == " Paris"
    assert withheld_of({"withheld": 3}) is None
    assert withheld_of(None) is None


@pytest.mark.parametrize(
    "settings",
    [
        {"withheld_answer": " "},
        {"max_target_tokens": 0},
        {"subject_prompts": ("no slot here",)},
        {"subject_prompts": ("{subject} and {other}",)},
    ],
)
def test_bad_kinds_settings_are_refused(settings: dict[str, object]) -> None:
    with pytest.raises(FieldError):
        KindsConfig(**settings)  # type: ignore[arg-type]
