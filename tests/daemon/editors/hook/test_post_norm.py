"""Hooks on architectures with a norm after the MLP (Gemma 2/3): the edit is added
after that norm, so the residual stream gets exactly what the editor solved for."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from daemon.editors.hook.layer import install_hooks, remove_hooks
from daemon.model import arch
from tests.daemon.model.conftest import eval_mode

_CONFIG: dict[str, Any] = {
    "vocab_size": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}


def _gemma3() -> nn.Module:
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(head_dim=16, **_CONFIG))
    with torch.no_grad():  # a trained model's norm gains are far from 1 (Gemma-3-270m: 2-300)
        for i in range(2):
            norm = arch.post_mlp_norm_module(model, i)
            assert norm is not None
            weight = norm.weight
            assert isinstance(weight, torch.Tensor)
            weight.uniform_(5.0, 20.0)
    return eval_mode(model)


def _block_outputs(model: nn.Module, ids: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """Layer ``layer``'s MLP-output-projection input and the block's output."""
    seen: dict[str, torch.Tensor] = {}

    def grab_in(_m: nn.Module, args: Any) -> None:
        seen["key"] = args[0].detach().clone()

    def grab_out(_m: nn.Module, _a: Any, out: Any) -> None:
        seen["resid"] = (out[0] if isinstance(out, tuple) else out).detach().clone()

    handles = [
        arch.mlp_out_module(model, layer).register_forward_pre_hook(grab_in),
        arch.layer_block(model, layer).register_forward_hook(grab_out),
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_gemma_hook_adds_its_edit_to_the_residual_after_the_norm() -> None:
    model = _gemma3()
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    base = _block_outputs(model, ids, 1)
    before_logits = model(input_ids=ids).logits.detach()
    hooks = install_hooks(model, [1])
    hook = hooks[1]
    delta = torch.randn(hook.d_out, hook.d_in, generator=torch.Generator().manual_seed(2)) * 0.05
    hook.set_delta(delta)
    hook.gate_mode = "open"
    try:
        edited = _block_outputs(model, ids, 1)
        assert torch.equal(edited["key"], base["key"])  # the edit sits after the projection
        expected = base["resid"] + base["key"] @ delta.T
        torch.testing.assert_close(edited["resid"], expected, rtol=1e-4, atol=1e-4)
        hook.gate_mode = "closed"
        assert torch.equal(model(input_ids=ids).logits, before_logits)
    finally:
        remove_hooks(model, hooks)
    norm = arch.post_mlp_norm_module(model, 1)
    assert norm is not None and not norm._forward_hooks  # the norm is as it was
    assert torch.equal(model(input_ids=ids).logits, before_logits)


def test_llama_hook_adds_to_the_projection_output() -> None:
    torch.manual_seed(0)
    model = eval_mode(LlamaForCausalLM(LlamaConfig(**_CONFIG)))
    assert arch.post_mlp_norm_module(model, 0) is None
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(1))
    base = _block_outputs(model, ids, 0)
    hooks = install_hooks(model, [0])
    delta = torch.randn(hooks[0].d_out, hooks[0].d_in) * 0.05
    hooks[0].set_delta(delta)
    hooks[0].gate_mode = "open"
    try:
        edited = _block_outputs(model, ids, 0)
        expected = base["resid"] + base["key"] @ delta.T
        torch.testing.assert_close(edited["resid"], expected, rtol=1e-4, atol=1e-4)
    finally:
        remove_hooks(model, hooks)


def test_a_hook_defers_past_one_norm_only() -> None:
    model = _gemma3()
    hooks = install_hooks(model, [0])
    try:
        norm = arch.post_mlp_norm_module(model, 0)
        assert norm is not None
        with pytest.raises(ValueError, match="already"):
            hooks[0].defer_past(norm)
    finally:
        remove_hooks(model, hooks)
