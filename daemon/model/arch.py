"""The architecture table: the only module in editd that knows module paths and layouts.

Every other module asks this one for "the MLP output projection of layer 5" or "the
dotted name to hand to peft" and never spells ``"model.layers"`` or
``"transformer.h"`` itself (a test greps for that). Adding an architecture means
adding one ``ArchSpec`` row to ``_SPECS``.

Paths are dotted names exactly as ``model.named_modules()`` reports them for the
bare ``*ForCausalLM`` model; per-layer paths hold an ``{i}`` placeholder. The same
names work as peft ``target_modules`` (peft matches on the name's suffix), and a
peft-wrapped model is looked through via ``get_base_model()``.

Projection weights come in two layouts, told apart by the MODULE TYPE, never by
the shape (a square matrix would fool a shape test):

- ``nn.Linear`` stores ``weight`` as ``[out, in]`` and computes ``x @ W.T + b``;
- transformers' ``Conv1D`` (GPT-2) stores ``weight`` as ``[in, out]`` and computes
  ``x @ W + b``.

Editors work in the ``[out, in]`` convention throughout and let the helpers here
translate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from daemon.errors import UnsupportedArchitectureError

Role = Literal[
    "block",
    "attn",
    "mlp",
    "mlp_in",
    "mlp_gate",
    "mlp_out",
    "layers",
    "embed",
    "final_norm",
    "lm_head",
    "post_mlp_norm",
]
"""Module roles accepted by ``module_path``; the per-layer ones need a layer index."""

_LAYER_ROLES: tuple[str, ...] = (
    "block",
    "attn",
    "mlp",
    "mlp_in",
    "mlp_gate",
    "mlp_out",
    "post_mlp_norm",
)
_GLOBAL_ROLES: tuple[str, ...] = ("layers", "embed", "final_norm", "lm_head")


@dataclass(frozen=True)
class ArchSpec:
    """Where things live in one family of causal LMs.

    Per-layer templates contain ``{i}``. ``mlp_in`` lists the MLP's input
    projections (up then gate for gated MLPs); ``mlp_out`` is the projection back
    to the residual stream, the module the editors read keys at and write into.
    ``intermediate_attr`` may be ``None`` on the config (GPT-2's ``n_inner``), in
    which case the size is read off the ``mlp_out`` module. ``post_mlp_norm`` names a
    norm between ``mlp_out`` and the residual stream (Gemma 2 and 3 normalise the
    MLP's output before adding it), or is None where the output is added as it is.
    """

    model_type: str
    layers: str
    block: str
    attn: str
    mlp: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    embed: str
    final_norm: str
    lm_head: str
    num_layers_attr: str
    hidden_size_attr: str
    intermediate_attr: str
    post_mlp_norm: str | None = None

    def path(self, role: str, i: int | None = None) -> str:
        """The dotted name of ``role`` (in layer ``i`` for per-layer roles)."""
        if role in _GLOBAL_ROLES:
            if i is not None:
                raise ValueError(f"role '{role}' takes no layer index")
            return str(getattr(self, role))
        if role not in _LAYER_ROLES:
            raise ValueError(
                f"unknown role '{role}' (expected one of {_LAYER_ROLES + _GLOBAL_ROLES})"
            )
        if i is None:
            raise ValueError(f"role '{role}' needs a layer index")
        if role == "mlp_in":
            template = self.mlp_in[0]
        elif role == "mlp_gate":
            if len(self.mlp_in) < 2:
                raise ValueError(f"architecture '{self.model_type}' has no gated MLP")
            template = self.mlp_in[1]
        elif role == "post_mlp_norm":
            if self.post_mlp_norm is None:
                raise ValueError(f"architecture '{self.model_type}' has no norm after its MLP")
            template = self.post_mlp_norm
        else:
            template = str(getattr(self, role))
        return template.format(i=i)


_GPT2 = ArchSpec(
    model_type="gpt2",
    layers="transformer.h",
    block="transformer.h.{i}",
    attn="transformer.h.{i}.attn",
    mlp="transformer.h.{i}.mlp",
    mlp_in=("transformer.h.{i}.mlp.c_fc",),  # Conv1D, weight [in, out]
    mlp_out="transformer.h.{i}.mlp.c_proj",  # Conv1D, weight [in, out]
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    num_layers_attr="n_layer",
    hidden_size_attr="n_embd",
    intermediate_attr="n_inner",  # None means 4 * n_embd
)

_GPTJ = ArchSpec(
    model_type="gptj",
    layers="transformer.h",
    block="transformer.h.{i}",
    attn="transformer.h.{i}.attn",
    mlp="transformer.h.{i}.mlp",
    mlp_in=("transformer.h.{i}.mlp.fc_in",),  # Linear, weight [out, in]
    mlp_out="transformer.h.{i}.mlp.fc_out",  # Linear, weight [out, in]
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    num_layers_attr="n_layer",
    hidden_size_attr="n_embd",
    intermediate_attr="n_inner",  # None means 4 * n_embd
)


def _llama_style(model_type: str, *, post_mlp_norm: str | None = None) -> ArchSpec:
    return ArchSpec(
        model_type=model_type,
        layers="model.layers",
        block="model.layers.{i}",
        attn="model.layers.{i}.self_attn",
        mlp="model.layers.{i}.mlp",
        mlp_in=("model.layers.{i}.mlp.up_proj", "model.layers.{i}.mlp.gate_proj"),
        mlp_out="model.layers.{i}.mlp.down_proj",
        embed="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        num_layers_attr="num_hidden_layers",
        hidden_size_attr="hidden_size",
        intermediate_attr="intermediate_size",
        post_mlp_norm=post_mlp_norm,
    )


_GPT_NEOX = ArchSpec(
    model_type="gpt_neox",
    layers="gpt_neox.layers",
    block="gpt_neox.layers.{i}",
    attn="gpt_neox.layers.{i}.attention",
    mlp="gpt_neox.layers.{i}.mlp",
    mlp_in=("gpt_neox.layers.{i}.mlp.dense_h_to_4h",),
    mlp_out="gpt_neox.layers.{i}.mlp.dense_4h_to_h",
    embed="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    lm_head="lm_head",
    num_layers_attr="num_hidden_layers",
    hidden_size_attr="hidden_size",
    intermediate_attr="intermediate_size",
)

_GEMMA_POST_MLP_NORM = "model.layers.{i}.post_feedforward_layernorm"

_SPECS: dict[str, ArchSpec] = {
    "gpt2": _GPT2,
    "gptj": _GPTJ,
    "gpt_neox": _GPT_NEOX,
    "llama": _llama_style("llama"),
    "mistral": _llama_style("mistral"),
    "qwen2": _llama_style("qwen2"),
    # Gemma: the same module paths; the embedding scales by sqrt(hidden) inside the
    # module. Gemma 2 and 3 pass each MLP's output through a post-feedforward norm
    # before the residual: the hook adds its edit after that norm.
    "gemma": _llama_style("gemma"),
    "gemma2": _llama_style("gemma2", post_mlp_norm=_GEMMA_POST_MLP_NORM),
    "gemma3_text": _llama_style("gemma3_text", post_mlp_norm=_GEMMA_POST_MLP_NORM),
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_SPECS))


# --- looking things up ---------------------------------------------------------------


def spec_for_model_type(model_type: str) -> ArchSpec:
    """The table row for a ``config.model_type``; raises for anything not in the table."""
    spec = _SPECS.get(model_type)
    if spec is None:
        raise UnsupportedArchitectureError(
            f"unsupported model_type '{model_type}' "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})",
            model_type=model_type,
            supported=list(SUPPORTED_MODEL_TYPES),
        )
    return spec


def _base(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        base = get_base()
        if isinstance(base, nn.Module):
            return base
    return model


def arch_for(model: nn.Module) -> ArchSpec:
    """The ``ArchSpec`` for a model, keyed by ``model.config.model_type``."""
    config = getattr(_base(model), "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str):
        raise UnsupportedArchitectureError(
            f"model {type(model).__name__} has no config.model_type "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})",
            model_class=type(model).__name__,
        )
    return spec_for_model_type(model_type)


def _config_int(model: nn.Module, attr: str) -> int | None:
    value = getattr(_base(model).config, attr, None)
    return int(value) if value is not None else None


def num_layers(model: nn.Module) -> int:
    """How many transformer blocks the model has."""
    spec = arch_for(model)
    value = _config_int(model, spec.num_layers_attr)
    if value is None:
        return len(list(get_module(model, spec.layers).children()))
    return value


def hidden_size(model: nn.Module) -> int:
    """The width of the residual stream."""
    spec = arch_for(model)
    value = _config_int(model, spec.hidden_size_attr)
    if value is None:
        return projection_in_out(mlp_out_module(model, 0))[1]
    return value


def intermediate_size(model: nn.Module) -> int:
    """The MLP's inner width (the ``in`` side of the MLP output projection)."""
    spec = arch_for(model)
    value = _config_int(model, spec.intermediate_attr)
    if value is None:  # GPT-2 / GPT-J leave n_inner unset and use 4 * hidden
        return projection_in_out(mlp_out_module(model, 0))[0]
    return value


def get_module(model: nn.Module, dotted: str) -> nn.Module:
    """The submodule at ``dotted`` (a ``named_modules()`` name), looking through peft."""
    try:
        return _base(model).get_submodule(dotted)
    except AttributeError as e:
        raise UnsupportedArchitectureError(
            f"model {type(model).__name__} has no module '{dotted}'", path=dotted
        ) from e


def _check_layer(model: nn.Module, i: int) -> None:
    n = num_layers(model)
    if not 0 <= i < n:
        raise IndexError(f"layer {i} out of range for a {n}-layer model")


def module_path(model: nn.Module, role: Role, i: int | None = None) -> str:
    """The dotted name of a module by role, for hooks and peft ``target_modules``.

    Per-layer roles (``block``, ``attn``, ``mlp``, ``mlp_in``, ``mlp_gate``,
    ``mlp_out``) need ``i``; model-wide roles (``layers``, ``embed``,
    ``final_norm``, ``lm_head``) take none. ``mlp_in`` is the up projection;
    ``mlp_gate`` exists only for gated (Llama-style) MLPs.
    """
    path = arch_for(model).path(role, i)
    if i is not None:
        _check_layer(model, i)
    return path


def layer_block(model: nn.Module, i: int) -> nn.Module:
    """Transformer block ``i``."""
    return get_module(model, module_path(model, "block", i))


def mlp_out_module(model: nn.Module, i: int) -> nn.Module:
    """The MLP output projection of layer ``i`` (c_proj / fc_out / dense_4h_to_h / down_proj)."""
    return get_module(model, module_path(model, "mlp_out", i))


def post_mlp_norm_module(model: nn.Module, i: int) -> nn.Module | None:
    """The norm between layer ``i``'s MLP output projection and the residual stream
    (Gemma 2/3's ``post_feedforward_layernorm``), or None where there is none."""
    if arch_for(model).post_mlp_norm is None:
        return None
    return get_module(model, module_path(model, "post_mlp_norm", i))


def mlp_in_modules(model: nn.Module, i: int) -> tuple[nn.Module, ...]:
    """The MLP input projection(s) of layer ``i``: ``(up,)`` or ``(up, gate)``."""
    _check_layer(model, i)
    return tuple(get_module(model, t.format(i=i)) for t in arch_for(model).mlp_in)


def lora_target_modules(
    model: nn.Module, layers: tuple[int, ...] | list[int], role: Role = "mlp_out"
) -> list[str]:
    """Full dotted names of ``role`` in each of ``layers``, for peft ``target_modules``."""
    return [module_path(model, role, i) for i in layers]


# --- default layer choices -----------------------------------------------------------


def default_melo_layers(model: nn.Module) -> tuple[int, ...]:
    """The upper third of the blocks (at least one): MELO's LoRA layers.

    L=2 → (1,); L=4 → (3,); L=12 → (8, 9, 10, 11); L=32 → (22, ..., 31).
    """
    n = num_layers(model)
    count = max(1, n // 3)
    return tuple(range(n - count, n))


def default_hook_layers(model: nn.Module) -> tuple[int, ...]:
    """A contiguous block of middle layers for the hook editor (at least one).

    Rule: from ``L // 4`` to ``L // 2`` inclusive, but stopping below the first
    MELO layer when that leaves at least one layer, so the two back-ends do not
    write the same modules. L=1 → (0,); L=2 → (0,); L=4 → (1, 2);
    L=12 → (3, 4, 5, 6); L=28 → (7, ..., 14).
    """
    n = num_layers(model)
    start = n // 4
    stop = min(n // 2, default_melo_layers(model)[0] - 1)
    return tuple(range(start, max(start, stop) + 1))


def default_key_layer(model: nn.Module) -> int:
    """The block whose output MELO's index reads keys from: the one below its LoRA layers.

    Keys must not depend on the adapters they select, so they come from below
    the lowest LoRA layer (block 0 for a one-layer model, where that cannot hold).
    """
    return max(0, default_melo_layers(model)[0] - 1)


# --- projection weights --------------------------------------------------------------


def unwrap_projection(module: nn.Module) -> nn.Module:
    """The plain Linear/Conv1D under wrappers, or ``module``.

    Wrappers name what they wrap ``base_layer`` (peft LoRA) or ``base`` (editd's
    hook layer and MELO block LoRA, which may wrap each other on the same layer).
    """
    while not isinstance(module, (nn.Linear, Conv1D)):
        inner = getattr(module, "base_layer", None)
        if inner is None:
            inner = getattr(module, "base", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"not a projection module: {type(module).__name__}")
        module = inner
    return module


def _weight(module: nn.Module) -> tuple[torch.Tensor, bool]:
    """The weight parameter and whether it is stored ``[in, out]`` (Conv1D)."""
    inner = unwrap_projection(module)
    weight = inner.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(inner).__name__}.weight is not a tensor")
    return weight, isinstance(inner, Conv1D)


def projection_in_out(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear or Conv1D projection."""
    weight, in_out = _weight(module)
    rows, cols = weight.shape
    return (int(rows), int(cols)) if in_out else (int(cols), int(rows))


def projection_weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (a transposed view for Conv1D; the parameter for Linear).

    The result shares storage with the module: clone before modifying.
    """
    weight, in_out = _weight(module)
    return weight.T if in_out else weight  # [out, in]


def projection_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias ``[out]`` or ``None``."""
    bias = unwrap_projection(module).bias
    return bias if isinstance(bias, torch.Tensor) else None


@torch.no_grad()
def add_to_projection_weight(module: nn.Module, delta_out_in: torch.Tensor) -> None:
    """Add an ``[out, in]`` delta to the weight in place, in the module's own layout.

    The sum is computed in float32 (float64 when either side is float64) and cast
    back to the weight's dtype, so low-precision weights lose only the final
    rounding.
    """
    weight, in_out = _weight(module)
    n_in, n_out = projection_in_out(module)
    if tuple(delta_out_in.shape) != (n_out, n_in):
        raise ValueError(
            f"delta shape {tuple(delta_out_in.shape)} does not match the projection's "
            f"[out, in] = [{n_out}, {n_in}]"
        )
    wide = torch.float64 if torch.float64 in (weight.dtype, delta_out_in.dtype) else torch.float32
    delta = delta_out_in.to(device=weight.device, dtype=wide)
    delta = delta.T if in_out else delta  # stored layout: [in, out] or [out, in]
    weight.copy_((weight.to(wide) + delta).to(weight.dtype))
