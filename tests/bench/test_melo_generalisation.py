"""The MELO generalisation benchmark's pure parts: prompt classes and settings."""

from __future__ import annotations

import pytest

from bench.melo_generalisation import leads_with_a_sentence, parse_settings


def test_rome_paraphrase_prompts_lead_with_an_unrelated_sentence() -> None:
    """CounterFact's rephrase field mixes ROME's paraphrase prompts (a sentence, then the
    fact) with its generation prompts; only the first kind lead with a sentence."""
    assert leads_with_a_sentence(
        "Regarding supplements, research shows mixed results. Edwin of Northumbria is",
        "Edwin of Northumbria",
    )
    assert leads_with_a_sentence("One person killed. Heath Brothers plays", "Heath Brothers")
    assert not leads_with_a_sentence(
        "Where Danielle Darrieux is from, people speak the language of", "Danielle Darrieux"
    )
    assert not leads_with_a_sentence("Apple A5 was created by", "Apple A5")
    assert not leads_with_a_sentence("Nothing about it.", "Kharkiv")


def test_settings_are_typed_by_the_melo_config() -> None:
    assert parse_settings(["stop_nll=0.002", "layers=20,21", "max_steps=50"]) == {
        "stop_nll": 0.002,
        "layers": (20, 21),
        "max_steps": 50,
    }
    with pytest.raises(AttributeError):
        parse_settings(["no_such_setting=1"])
