"""Perplexity on held-out text: padding-independent, routed, in the harness's scores."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from daemon.editors.noop import NoopEditor
from daemon.eval.cases import load_cases
from daemon.eval.harness import EvalSettings, Harness
from daemon.eval.perplexity import heldout_texts, perplexity
from daemon.model.loading import LoadedModel, load_model
from daemon.world.editsets import counterfactual_edits, write_jsonl

TEXTS = ["The capital of France is Paris.", "Rome", "A much longer sentence about Rome and Milan."]


@pytest.fixture(scope="module")
def loaded(micro_world: Path) -> LoadedModel:
    return load_model(str(micro_world), device="cpu")


def _by_hand(loaded: LoadedModel, texts: list[str], limit: int | None = None) -> float:
    nll: list[float] = []
    for text in texts:
        ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = loaded.model(input_ids=ids).logits[0, :-1]
        logp = torch.log_softmax(logits.double(), dim=-1)
        nll += (-logp.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)).tolist()
    nll = nll[:limit] if limit else nll
    return math.exp(sum(nll) / len(nll))


def test_perplexity_is_the_token_weighted_mean_whatever_the_padding(loaded: LoadedModel) -> None:
    got = perplexity(NoopEditor(), loaded.model, loaded.tokenizer, TEXTS, batch_size=3)
    assert got == pytest.approx(_by_hand(loaded, TEXTS), rel=1e-5)
    one_by_one = perplexity(NoopEditor(), loaded.model, loaded.tokenizer, TEXTS, batch_size=1)
    assert one_by_one == pytest.approx(got, rel=1e-5)
    capped = perplexity(NoopEditor(), loaded.model, loaded.tokenizer, TEXTS, max_tokens=5)
    assert capped == pytest.approx(_by_hand(loaded, TEXTS, limit=5), rel=1e-5)
    with pytest.raises(ValueError, match="needs texts"):
        perplexity(NoopEditor(), loaded.model, loaded.tokenizer, [])


def test_the_shipped_heldout_text() -> None:
    texts = heldout_texts()
    assert len(texts) == 303 and all(len(t.split()) >= 5 for t in texts)


def test_the_harness_reports_perplexity_before_and_after(
    loaded: LoadedModel, micro_world: Path, tmp_path: Path
) -> None:
    path = tmp_path / "edits.jsonl"
    write_jsonl(path, counterfactual_edits(micro_world, loaded.model, loaded.tokenizer, 2))
    cases = load_cases(path).cases
    settings = EvalSettings(n=2, checkpoints=(2,), progress=False)
    (scores,) = Harness(NoopEditor(), loaded, settings, ppl_texts=TEXTS).run(cases)
    assert scores.perplexity["base"] == scores.perplexity["edited"]  # noop changes nothing
    assert scores.perplexity["base"] == pytest.approx(_by_hand(loaded, TEXTS), rel=1e-4)
    (plain,) = Harness(NoopEditor(), loaded, settings).run(cases)
    assert plain.perplexity == {}
