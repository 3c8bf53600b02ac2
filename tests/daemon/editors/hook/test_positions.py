"""GPT-2 (absolute positions): a prompt gives the same keys, targets and checks in a
left-padded batch as alone, because every padded forward passes position ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from daemon.editors.base import EditSpec
from daemon.editors.hook.keys import KEY_KINDS, KeyKind, KeySites, capture, encode_sites
from daemon.editors.hook.layer import install_hooks, remove_hooks
from daemon.editors.hook.patching import TraceFact, capture_donor_states, prepare
from daemon.editors.hook.solve import check_recall
from daemon.editors.hook.targets import (
    EditText,
    TargetSettings,
    _essence_batch,
    _essence_logits,
    optimise_targets,
)
from daemon.model import arch
from daemon.model.batches import padding_id

SHORT = EditText("The chief executive of Acme is", " Jane Roe", "Acme")
LONG = EditText(
    "The river that runs through the old town of Greater Saint Petersburg is called",
    " the Neva",
    "Greater Saint Petersburg",
)
LAYERS = (0, 1)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tok(gpt2_tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir))
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.fixture(scope="module")
def model(tok: PreTrainedTokenizerBase) -> GPT2LMHeadModel:
    """An untrained 2-layer GPT-2 whose position embeddings matter as a trained one's do."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    gpt2 = GPT2LMHeadModel(config)
    gpt2.train(False)
    with torch.no_grad():
        gpt2.transformer.wpe.weight.mul_(50.0)
    return gpt2


def _sites(
    tok: PreTrainedTokenizerBase, edits: list[EditText], kind: KeyKind
) -> tuple[KeySites, torch.Tensor]:
    return encode_sites(
        tok,
        [e.prompt for e in edits],
        [e.target for e in edits],
        [e.subject for e in edits],
        list(range(len(edits))),
        kind,
        CPU,
    )


def _short_is_padded(sites: KeySites) -> None:
    """Row 1 (SHORT) really is left padded in the batch."""
    assert int(sites.attention_mask[1, 0]) == 0 and int(sites.attention_mask[0, 0]) == 1


@pytest.mark.parametrize("kind", KEY_KINDS)
def test_keys_and_residuals_are_the_same_alone_and_left_padded(
    kind: KeyKind, tok: PreTrainedTokenizerBase, model: GPT2LMHeadModel
) -> None:
    alone, _ = _sites(tok, [SHORT], kind)
    batch, _ = _sites(tok, [LONG, SHORT], kind)
    _short_is_padded(batch)
    mine = batch.owner == 1
    one = capture(model, {}, alone, LAYERS, 1, apply_deltas=False)
    both = capture(model, {}, batch, LAYERS, 1, apply_deltas=False)
    for layer in LAYERS:
        torch.testing.assert_close(both.keys[layer][mine], one.keys[layer], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both.residual[mine], one.residual, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KEY_KINDS)
def test_target_values_are_the_same_alone_and_left_padded(
    kind: KeyKind, tok: PreTrainedTokenizerBase, model: GPT2LMHeadModel
) -> None:
    """The unedited residual at the sites matches, and so does v* after one step.

    Adam's first step is ``-lr * g / (|g| + eps)``, the same for a gradient scaled by
    the batch's 1 / n_rows, except where |g| is near eps: this model's gradients at
    the subject's position are, so v* is compared for prompt_last keys only.
    """
    settings = TargetSettings(steps=1)
    one = optimise_targets(model, tok, {}, [SHORT], 0, kind, settings)
    both = optimise_targets(model, tok, {}, [LONG, SHORT], 0, kind, settings)
    mine = both.site_edit == 1
    assert one.steps == both.steps == 1
    torch.testing.assert_close(both.initial[mine], one.initial, rtol=1e-4, atol=1e-4)
    if kind == "prompt_last":
        torch.testing.assert_close(both.values[mine], one.values, rtol=1e-4, atol=1e-3)


def test_essence_logits_are_the_same_alone_and_left_padded(
    tok: PreTrainedTokenizerBase, model: GPT2LMHeadModel
) -> None:
    """The "{subject} is a" prompts the KL term holds (subject_last keys)."""
    one = _essence_batch(tok, [SHORT], "subject_last", CPU)
    both = _essence_batch(tok, [LONG, SHORT], "subject_last", CPU)
    assert one is not None and both is not None
    assert int(both["attention_mask"][1, 0]) == 0  # SHORT's essence prompt is padded
    with torch.no_grad():
        alone, batched = _essence_logits(model, one), _essence_logits(model, both)
    torch.testing.assert_close(batched[1:], alone, rtol=1e-4, atol=1e-4)


def test_the_recall_check_sees_the_keys_of_the_prompt_alone(
    tok: PreTrainedTokenizerBase, model: GPT2LMHeadModel
) -> None:
    """The gate routes on the MLP input at the key sites: check_recall's forward must
    give the padded batch the same inputs there as the prompt alone."""
    seen: list[torch.Tensor] = []
    module = arch.mlp_out_module(model, 1)
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    specs = [EditSpec(f"e{i}", e.prompt, e.target, e.subject) for i, e in enumerate([LONG, SHORT])]
    try:
        alone, _ = _sites(tok, [SHORT], "prompt_last")
        batch, _ = _sites(tok, [LONG, SHORT], "prompt_last")
        _short_is_padded(batch)
        with torch.no_grad():
            check_recall(model, {}, specs[1:], alone, shard=0)
            check_recall(model, {}, specs, batch, shard=0)
    finally:
        handle.remove()
    one = seen[0][alone.rows, alone.positions]
    mine = batch.owner == 1
    both = seen[1][batch.rows[mine], batch.positions[mine]]
    torch.testing.assert_close(both, one, rtol=1e-4, atol=1e-4)


def test_locate_states_are_the_same_alone_and_left_padded(
    tok: PreTrainedTokenizerBase, model: GPT2LMHeadModel
) -> None:
    """Donor states of a short fact batched with a longer one equal those of one-row batches."""
    prep = prepare(
        tok,
        [TraceFact(SHORT.prompt, SHORT.subject or ""), TraceFact(LONG.prompt, LONG.subject or "")],
    )
    assert len(prep.rows[0]) < len(prep.rows[1])
    with torch.no_grad():
        batched = capture_donor_states(model, prep, padding_id(tok), batch_rows=2)
        alone = capture_donor_states(model, prep, padding_id(tok), batch_rows=1)
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)


def test_subject_keys_with_hooks_installed_and_prompts_wider_than_the_essence(
    tok: PreTrainedTokenizerBase, model: GPT2LMHeadModel
) -> None:
    """The "{subject} is a" batch is narrower than the edits' prompts: its forward must not
    run under the sites' position mask (it crashed: "gate position mask (2, 17) does not
    fit input (2, 6, 128)"). The KL term's base is read with the hooks as they stand,
    as every later KL forward is."""
    hooks = install_hooks(model, [1])
    torch.manual_seed(0)
    for hook in hooks.values():  # an earlier batch's delta: the hook acts in the forwards
        hook.set_delta(torch.randn(hook.d_out, hook.d_in) * 0.01)
    try:
        settings = TargetSettings(steps=2, kl_weight=0.5)
        result = optimise_targets(model, tok, hooks, [LONG, SHORT], 1, "subject_last", settings)
    finally:
        remove_hooks(model, hooks)
    assert result.values.shape == result.initial.shape == (2, 32)
    assert torch.isfinite(result.values).all()
