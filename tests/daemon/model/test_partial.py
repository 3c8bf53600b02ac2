"""forward_until stops the forward once a module has run; replaying starts it above a
block, from that block's recorded output."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedModel

from daemon.model import arch
from daemon.model.batches import padded_forward_inputs
from daemon.model.partial import forward_until, record_block_output, replaying
from tests.daemon.model.conftest import eval_mode, tiny_gpt2, tiny_llama


def test_nothing_above_the_module_runs_and_its_hooks_see_their_input() -> None:
    model = tiny_llama(n_layer=2)
    ran: list[str] = []
    seen: list[torch.Tensor] = []
    first_mlp = arch.mlp_out_module(model, 0)
    first_mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    arch.layer_block(model, 1).register_forward_pre_hook(lambda *_: ran.append("block 1"))
    arch.get_module(model, "lm_head").register_forward_pre_hook(lambda *_: ran.append("head"))
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        forward_until(model, first_mlp, input_ids=ids, use_cache=False)
    assert ran == [] and len(seen) == 1 and seen[0].shape == (1, 3, 64)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    assert ran == ["block 1", "head"]


def test_a_module_outside_the_forward_is_an_error() -> None:
    model = tiny_llama(n_layer=2)
    with pytest.raises(RuntimeError, match="never reached Linear"), torch.no_grad():
        forward_until(model, nn.Linear(2, 2), input_ids=torch.tensor([[3, 4]]))


def _gemma3() -> PreTrainedModel:
    config = Gemma3TextConfig(
        vocab_size=64,
        num_hidden_layers=4,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=2,  # local and global layers both above the replayed block
    )
    return eval_mode(Gemma3ForCausalLM(config))


BUILDERS: dict[str, Callable[[], PreTrainedModel]] = {
    "llama": lambda: tiny_llama(n_layer=4),
    "gpt2": lambda: tiny_gpt2(n_layer=4),  # absolute positions, left padding
    "gemma3": _gemma3,
}


def _add_at(model: nn.Module, layer: int, delta: torch.Tensor) -> Any:
    def hook(_m: nn.Module, _a: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            return (out[0] + delta, *out[1:])
        return out + delta

    return arch.layer_block(model, layer).register_forward_hook(hook)


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("layer", [0, 2])
def test_replaying_gives_the_full_forwards_logits_and_gradient(name: str, layer: int) -> None:
    torch.manual_seed(0)
    model = BUILDERS[name]()
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    inputs = padded_forward_inputs(ids, mask)
    recorded = record_block_output(model, layer, **inputs)
    ran: list[int] = []
    for i in range(4):
        arch.layer_block(model, i).register_forward_pre_hook(lambda *_a, i=i: ran.append(i))
    results = []
    for replay in (False, True):
        ran.clear()
        delta = torch.zeros(2, 6, 32, requires_grad=True)
        with replaying(model, layer, recorded) if replay else torch.enable_grad():
            handle = _add_at(model, layer, delta)
            try:
                logits = model(**inputs, use_cache=False).logits
            finally:
                handle.remove()
        logits[:, -2:].pow(2).sum().backward()
        assert delta.grad is not None
        results.append((logits.detach(), delta.grad.clone(), list(ran)))
    (full, grad_full, ran_full), (replayed, grad_replayed, ran_replayed) = results
    torch.testing.assert_close(replayed, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_replayed, grad_full, rtol=1e-4, atol=1e-5)
    assert ran_full == [0, 1, 2, 3] and ran_replayed == list(range(layer + 1, 4))
    ran.clear()
    with torch.no_grad():
        model(**inputs, use_cache=False)
    assert ran == [0, 1, 2, 3]  # the real blocks (and their hooks) are back


def test_replaying_refuses_another_batch() -> None:
    model = tiny_llama(n_layer=2)
    recorded = record_block_output(model, 0, input_ids=torch.tensor([[3, 4, 5]]))
    with replaying(model, 0, recorded), pytest.raises(RuntimeError, match="same batch"):
        model(input_ids=torch.tensor([[3, 4, 5, 6]]), use_cache=False)
    assert arch.layer_block(model, 0).__class__.__name__ != "_Replay"
