"""The routing policy: which back-end an ``auto`` edit goes to, and why."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from daemon.config import RouterConfig
from daemon.editors.registry import HOOK, MELO
from daemon.engine.router import route
from store.schema import EditRequest

FACT = EditRequest(prompt="The capital of Zorland is", target=" Quux", subject="Zorland")
NOTE = EditRequest(prompt="A note without a subject:", target=" anything at all")
LONG = EditRequest(
    prompt="The motto of Zorland is",
    target=" one two three four five six seven eight nine ten eleven twelve",
    subject="Zorland",
)
BOTH = (HOOK, MELO)


@pytest.fixture(scope="module")
def tokenizer(micro_world: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(micro_world))


def test_facts_go_to_melo_when_its_keys_read_the_subject(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """With subject keys MELO takes the facts; with prompt-last keys the hook does."""
    chosen = route(FACT, RouterConfig(), tokenizer, BOTH, melo_reads_subjects=True)
    assert chosen.backend is MELO and "subject" in chosen.reason
    chosen = route(FACT, RouterConfig(), tokenizer, BOTH, melo_reads_subjects=False)
    assert chosen == route(FACT, RouterConfig(), tokenizer, BOTH)
    assert chosen.backend is HOOK


@pytest.mark.parametrize("by_subject", [True, False])
def test_subjectless_and_long_target_edits_go_to_melo(
    tokenizer: PreTrainedTokenizerBase, by_subject: bool
) -> None:
    config = RouterConfig(hook_max_target_tokens=4)
    assert route(NOTE, config, tokenizer, BOTH, by_subject).reason == "no subject: MELO"
    long = route(LONG, config, tokenizer, BOTH, by_subject)
    assert long.backend is MELO and "(> 4)" in long.reason


def test_auto_never_picks_a_backend_this_daemon_lacks(tokenizer: PreTrainedTokenizerBase) -> None:
    """The other back-end takes the edit, saying why; an explicit request is kept."""
    only_hook = route(FACT, RouterConfig(), tokenizer, (HOOK,), melo_reads_subjects=True)
    assert only_hook == route(NOTE, RouterConfig(), tokenizer, (HOOK,))
    assert only_hook.backend is HOOK
    assert only_hook.reason == "melo back-end unavailable: hook"
    only_melo = route(FACT, RouterConfig(), tokenizer, (MELO,))
    assert only_melo.backend is MELO
    assert only_melo.reason == "hook back-end unavailable: melo"
    named = EditRequest(prompt=FACT.prompt, target=FACT.target, backend=HOOK)
    assert route(named, RouterConfig(), tokenizer, (MELO,)).backend is HOOK


def test_default_backend_overrides_the_rule(tokenizer: PreTrainedTokenizerBase) -> None:
    config = RouterConfig(default_backend="hook")
    chosen = route(NOTE, config, tokenizer, BOTH, melo_reads_subjects=True)
    assert chosen.backend is HOOK and chosen.reason == "router.default_backend"
