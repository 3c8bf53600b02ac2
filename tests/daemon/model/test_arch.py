"""The architecture table, on tiny random models of every supported family."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import pytest
import torch
from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from daemon.errors import UnsupportedArchitectureError
from daemon.model import arch
from tests.daemon.model.conftest import eval_mode, tiny_gpt2, tiny_llama

_SMALL: dict[str, Any] = {"vocab_size": 64, "bos_token_id": 1, "eos_token_id": 2}
_LLAMA_LIKE: dict[str, Any] = {
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    **_SMALL,
}

BUILDERS: dict[str, Callable[[], PreTrainedModel]] = {
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "gptj": lambda: GPTJForCausalLM(
        GPTJConfig(n_layer=2, n_embd=32, n_head=2, rotary_dim=8, n_positions=64, **_SMALL)
    ),
    "gpt_neox": lambda: GPTNeoXForCausalLM(
        GPTNeoXConfig(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            **_SMALL,
        )
    ),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_LLAMA_LIKE)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_LLAMA_LIKE)),
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(head_dim=16, **_LLAMA_LIKE)),
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(head_dim=16, **_LLAMA_LIKE)),
    "gemma3_text": lambda: Gemma3ForCausalLM(Gemma3TextConfig(head_dim=16, **_LLAMA_LIKE)),
}
GATED = {"llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text"}
INTERMEDIATE = {name: 64 for name in GATED} | {"gpt2": 128, "gptj": 128, "gpt_neox": 64}


def conv1d(n_out: int, n_in: int) -> nn.Module:
    """transformers' Conv1D(nf=out, nx=in), whose constructor is unannotated."""
    return cast(nn.Module, cast(Any, Conv1D)(n_out, n_in))


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


@pytest.fixture(scope="module")
def models() -> dict[str, PreTrainedModel]:
    torch.manual_seed(0)
    return {name: eval_mode(build()) for name, build in BUILDERS.items()}


@pytest.fixture(params=sorted(BUILDERS))
def model(request: pytest.FixtureRequest, models: dict[str, PreTrainedModel]) -> PreTrainedModel:
    return models[request.param]


def test_table_covers_the_builders() -> None:
    """Every family the table lists has a tiny model in these tests."""
    assert set(arch.SUPPORTED_MODEL_TYPES) == set(BUILDERS)


def test_sizes_come_from_the_config(model: PreTrainedModel) -> None:
    """Layer count, hidden and intermediate sizes match the built model."""
    spec = arch.arch_for(model)
    assert spec.model_type == model.config.model_type
    assert arch.num_layers(model) == 2
    assert arch.hidden_size(model) == 32
    assert arch.intermediate_size(model) == INTERMEDIATE[spec.model_type]


def test_every_path_is_a_named_module(model: PreTrainedModel) -> None:
    """module_path returns names exactly as named_modules() spells them."""
    names = dict(model.named_modules())
    roles = ["block", "attn", "mlp", "mlp_in", "mlp_out"]
    for i in range(arch.num_layers(model)):
        for role in roles:
            path = arch.module_path(model, role, i)  # type: ignore[arg-type]
            assert names[path] is arch.get_module(model, path)
    for role in ["layers", "embed", "final_norm", "lm_head"]:
        assert arch.module_path(model, role) in names  # type: ignore[arg-type]
    assert isinstance(arch.get_module(model, arch.module_path(model, "layers")), nn.ModuleList)
    assert isinstance(arch.get_module(model, arch.module_path(model, "embed")), nn.Embedding)
    assert arch.get_module(model, "lm_head") is model.lm_head


def test_module_types_at_each_path(model: PreTrainedModel) -> None:
    """GPT-2's MLP projections are Conv1D; every other family's are nn.Linear."""
    expected = Conv1D if model.config.model_type == "gpt2" else nn.Linear
    for i in range(2):
        assert isinstance(arch.mlp_out_module(model, i), expected)
        ins = arch.mlp_in_modules(model, i)
        gated = model.config.model_type in GATED
        assert len(ins) == (2 if gated else 1)
        assert all(isinstance(m, expected) for m in ins)
        block = arch.layer_block(model, i)
        assert block is arch.get_module(model, arch.module_path(model, "layers"))[i]  # type: ignore[index]


def test_projection_shapes(model: PreTrainedModel) -> None:
    """The MLP out projection maps intermediate → hidden; its [out, in] weight says so."""
    out = arch.mlp_out_module(model, 1)
    n_inter = arch.intermediate_size(model)
    assert arch.projection_in_out(out) == (n_inter, 32)
    assert tuple(arch.projection_weight_out_in(out).shape) == (32, n_inter)
    up = arch.mlp_in_modules(model, 1)[0]
    assert arch.projection_in_out(up) == (32, n_inter)


def _reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    w = arch.projection_weight_out_in(module)  # [out, in]
    b = arch.projection_bias(module)
    y = x @ w.T  # [B, out]
    return y + b if b is not None else y


def test_weight_out_in_matches_the_forward(model: PreTrainedModel) -> None:
    """module(x) == x @ W_out_in.T + b for the MLP out and in projections."""
    for module in [arch.mlp_out_module(model, 0), *arch.mlp_in_modules(model, 0)]:
        n_in, _ = arch.projection_in_out(module)
        x = torch.randn(5, n_in)  # [B, in]
        torch.testing.assert_close(module(x), _reference(module, x))


@pytest.mark.parametrize("kind", ["conv1d", "linear"])
def test_square_projection_is_told_apart_by_type(kind: str) -> None:
    """A square weight cannot fool the helpers: they branch on the module type."""
    torch.manual_seed(1)
    module = conv1d(8, 8) if kind == "conv1d" else nn.Linear(8, 8)
    nn.init.normal_(_weight(module))  # Conv1D's default init is tiny but not symmetric
    x = torch.randn(3, 8)
    torch.testing.assert_close(module(x), _reference(module, x))


def test_add_to_projection_weight_changes_output_by_x_delta(model: PreTrainedModel) -> None:
    """Adding an [out, in] delta moves the output by exactly x @ delta.T."""
    torch.manual_seed(2)
    module = arch.mlp_out_module(model, 1)
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    n_in, n_out = arch.projection_in_out(module)
    x = torch.randn(4, n_in)  # [B, in]
    delta = torch.randn(n_out, n_in, dtype=torch.float64) * 0.01  # [out, in]
    before = module(x)
    try:
        arch.add_to_projection_weight(module, delta)
        after = module(x)
    finally:
        module.load_state_dict(saved)
    assert module.weight.dtype == torch.float32
    torch.testing.assert_close(after - before, x @ delta.float().T, atol=1e-5, rtol=1e-4)


def test_add_to_projection_weight_rounds_once_in_low_precision() -> None:
    """A bfloat16 weight gets (w + delta) computed wide and rounded once."""
    module = conv1d(6, 4).to(torch.bfloat16)  # weight [in=4, out=6]
    nn.init.normal_(_weight(module))
    original = _weight(module).detach().clone()
    delta = torch.randn(6, 4) * 1e-3  # [out, in]
    arch.add_to_projection_weight(module, delta)
    assert _weight(module).dtype == torch.bfloat16
    expected = (original.float() + delta.T).to(torch.bfloat16)
    assert torch.equal(_weight(module), expected)


def test_add_to_projection_weight_rejects_wrong_shape() -> None:
    """A delta in the stored [in, out] layout is refused, not silently transposed."""
    module = conv1d(6, 4)
    with pytest.raises(ValueError, match=r"\[out, in\] = \[6, 4\]"):
        arch.add_to_projection_weight(module, torch.zeros(4, 6))


def test_module_path_errors() -> None:
    """Out-of-range layers, misplaced indices and missing gates are errors."""
    gpt2 = tiny_gpt2()
    with pytest.raises(IndexError, match="layer 2 out of range"):
        arch.module_path(gpt2, "mlp_out", 2)
    with pytest.raises(ValueError, match="takes no layer index"):
        arch.module_path(gpt2, "embed", 0)
    with pytest.raises(ValueError, match="needs a layer index"):
        arch.module_path(gpt2, "mlp_out")
    with pytest.raises(ValueError, match="no gated MLP"):
        arch.module_path(gpt2, "mlp_gate", 0)
    with pytest.raises(ValueError, match="unknown role"):
        arch.module_path(gpt2, "mlp_sideways", 0)  # type: ignore[arg-type]
    assert arch.module_path(tiny_llama(), "mlp_gate", 1).endswith("gate_proj")


def test_unsupported_model_names_its_type_and_the_supported_ones() -> None:
    """A causal LM outside the table (GPT-Neo) is refused with a useful message."""
    with torch.device("meta"):
        neo = GPTNeoForCausalLM(
            GPTNeoConfig(
                num_layers=2, hidden_size=32, num_heads=2, attention_types=[[["global"], 2]]
            )
        )
    with pytest.raises(UnsupportedArchitectureError) as info:
        arch.arch_for(neo)
    assert "gpt_neo" in str(info.value)
    assert "gpt2" in str(info.value) and "llama" in str(info.value)
    with pytest.raises(UnsupportedArchitectureError, match=r"no config\.model_type"):
        arch.num_layers(nn.Linear(2, 2))


def _meta_gpt2(n_layer: int) -> GPT2LMHeadModel:
    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=8, n_head=2, vocab_size=16))


@pytest.mark.parametrize("n_layer", [1, 2, 3, 4, 6, 12, 24, 28, 48])
def test_default_layers_are_in_range_and_ordered(n_layer: int) -> None:
    """Hook layers are a middle block, MELO layers the top, the key layer below MELO."""
    model = _meta_gpt2(n_layer)
    hook = arch.default_hook_layers(model)
    melo = arch.default_melo_layers(model)
    key = arch.default_key_layer(model)
    for layers in (hook, melo):
        assert layers, "at least one layer"
        assert list(layers) == list(range(layers[0], layers[-1] + 1)), "contiguous"
        assert layers[0] >= 0 and layers[-1] < n_layer
    assert melo[-1] == n_layer - 1
    assert 0 <= key < n_layer
    if n_layer > 1:
        assert key < melo[0]
        assert not set(hook) & set(melo)


def test_default_layers_worked_examples() -> None:
    """The documented examples hold."""
    assert arch.default_hook_layers(_meta_gpt2(4)) == (1, 2)
    assert arch.default_melo_layers(_meta_gpt2(4)) == (3,)
    assert arch.default_key_layer(_meta_gpt2(4)) == 2
    assert arch.default_hook_layers(_meta_gpt2(12)) == (3, 4, 5, 6)
    assert arch.default_melo_layers(_meta_gpt2(12)) == (8, 9, 10, 11)
    assert arch.default_hook_layers(_meta_gpt2(2)) == (0,)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft 0.21.2
def test_lora_targets_work_with_peft_and_lookups_see_through_it() -> None:
    """peft wraps exactly the named modules; arch helpers still work on the PeftModel."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    targets = arch.lora_target_modules(model, (1,))
    assert targets == [arch.module_path(model, "mlp_out", 1)]
    x = torch.randn(3, 64)  # [B, intermediate]
    expected = arch.mlp_out_module(model, 1)(x)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    assert wrapped == [f"base_model.model.{targets[0]}"]
    assert arch.num_layers(peft_model) == 2
    module = arch.mlp_out_module(peft_model, 1)
    assert not isinstance(module, nn.Linear)  # the LoRA wrapper
    assert isinstance(arch.unwrap_projection(module), nn.Linear)
    torch.testing.assert_close(_reference(module, x), expected)


def test_post_mlp_norm_only_where_the_mlp_output_is_normalised(
    models: dict[str, PreTrainedModel],
) -> None:
    for name, model in models.items():
        norm = arch.post_mlp_norm_module(model, 1)
        if name in {"gemma2", "gemma3_text"}:
            assert norm is arch.layer_block(model, 1).post_feedforward_layernorm
        else:
            assert norm is None, name
            with pytest.raises(ValueError, match="no norm after its MLP"):
                arch.module_path(model, "post_mlp_norm", 1)
