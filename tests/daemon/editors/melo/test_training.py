"""Training one MELO block: converges to the target, touches no other block."""

from __future__ import annotations

import torch

from daemon.editors.melo import layer as bl
from daemon.editors.melo.training import TrainSettings, run_on_tokens, train_block
from daemon.model import arch
from daemon.model.batches import encode_prompt_target
from daemon.model.loading import LoadedModel


def test_train_block_reaches_the_target_and_leaves_other_blocks(
    loaded: LoadedModel, world_edits: list[dict[str, object]]
) -> None:
    """The trained block makes every row's target the argmax; block 0 stays as it was."""
    installed = bl.install_block_lora(loaded.model, arch.default_melo_layers(loaded.model), 3, 2)
    try:
        bl.init_block(installed, 0, 0)
        before = bl.block_state(installed, 0)
        bl.init_block(installed, 2, 2)
        record = world_edits[0]
        prompts = [str(record["prompt"]), *(str(r) for r in record["rephrases"])]  # type: ignore[attr-defined]
        batch = encode_prompt_target(loaded.tokenizer, prompts, [str(record["target"])] * 4)
        result = train_block(
            loaded.model, loaded.tokenizer, installed, 2, batch, TrainSettings(1e-2, 200)
        )
        assert result.converged and 0 < result.steps <= 200
        assert all(torch.equal(before[k], v) for k, v in bl.block_state(installed, 0).items())
        assert not any(p.requires_grad for p in loaded.model.parameters())
    finally:
        bl.remove_block_lora(loaded.model, installed)


def test_run_on_tokens_flags_a_target_continued_into_a_longer_word(
    loaded: LoadedModel,
) -> None:
    """A next token that glues onto the target's last word is reported; a space is not."""
    tok = loaded.tokenizer
    batch = encode_prompt_target(tok, ["The capital of Velmora is"], [" Ab"])
    vocab = tok.get_vocab()
    glue = next(i for t, i in vocab.items() if t.isascii() and t.isalpha() and len(t) > 1)
    space = next(
        i for t, i in vocab.items() if t.startswith("Ġ") and t[1:].isascii() and t[1:].isalpha()
    )
    width = batch.input_ids.shape[1]
    for token, flagged in ((glue, True), (space, False)):
        logits = torch.zeros(1, width, len(vocab))
        logits[0, -1, token] = 1.0
        assert (run_on_tokens(tok, batch, logits) == [token]) is flagged


def test_replaying_the_blocks_below_trains_the_same_block(
    loaded: LoadedModel, world_edits: list[dict[str, object]]
) -> None:
    """``first_layer`` (blocks below the LoRA replayed) changes the cost, not the result."""
    layers = arch.default_melo_layers(loaded.model)
    assert min(layers) > 0
    record = world_edits[1]
    prompts = [str(record["prompt"]), *(str(r) for r in record["rephrases"])]  # type: ignore[attr-defined]
    batch = encode_prompt_target(loaded.tokenizer, prompts, [str(record["target"])] * 4)
    outcomes = []
    for first in (0, min(layers)):
        installed = bl.install_block_lora(loaded.model, layers, 3, 2)
        try:
            bl.init_block(installed, 1, 1)
            result = train_block(
                loaded.model,
                loaded.tokenizer,
                installed,
                1,
                batch,
                TrainSettings(1e-2, 200),
                first_layer=first,
            )
            outcomes.append((result, bl.block_state(installed, 1)))
        finally:
            bl.remove_block_lora(loaded.model, installed)
    (full, full_state), (replayed, replayed_state) = outcomes
    assert full.converged and replayed.steps == full.steps
    assert replayed.row_hits == full.row_hits
    for name, value in full_state.items():
        torch.testing.assert_close(replayed_state[name], value, rtol=1e-4, atol=1e-6)
