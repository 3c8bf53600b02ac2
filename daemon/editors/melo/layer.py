"""MELO's LoRA layer: one projection's LoRA rank split into non-overlapping, routed blocks.

:class:`BlockLoraProjection` wraps a Linear or Conv1D projection (layouts are
handled by ``daemon.model.arch``; the base module is called as is and never
modified). Its LoRA rank ``r_total = capacity * rank_per_block`` is partitioned
into ``capacity`` blocks; block ``b`` owns rows ``b*r .. (b+1)*r - 1`` of
``A`` (``[r_total, d_in]``) and the same columns of ``B`` (``[d_out, r_total]``).
Each block is stored as its own pair of parameters (``lora_A[b]`` ``[r, d_in]``,
``lora_B[b]`` ``[d_out, r]``); ``full_A``/``full_B`` concatenate them into the
partitioned matrices. Separate parameters make the isolation structural: an
optimizer given ``trainable_block(b)``'s parameters cannot touch another block,
whatever its weight decay or momentum.

For a batch row routed to block ``b`` (see ``routing.route_rows``)::

    y = base(x) + scale * ((x @ A_b.T) @ B_b.T)

Rows routed to None, rows outside any routing context, and rows routed to a
cleared (inactive) block skip the addition entirely, so their output is the base
module's output, bit for bit. The routed rows are updated together: each row's
``A_b``/``B_b`` are stacked and applied by two batched matmuls (``torch.bmm``),
not one matmul per block.

Memory per block and projection: ``rank_per_block * (d_in + d_out)`` parameters
in the LoRA dtype (float32 unless the base weight is float64); see
``block_nbytes`` and :func:`block_memory_bytes`. Blocks are allocated on demand:
block ``b``'s parameters are created the first time it is initialised, loaded or
trained (with every block below it, so ids stay list positions); ``capacity`` is
only the highest block id allowed, so an unused capacity costs nothing. A route
to a block never created is a route to a cleared block: the base output.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from daemon.editors.melo.routing import current_routes
from daemon.model import arch


def _lora_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


class BlockLoraProjection(nn.Module):
    """A frozen projection plus ``capacity`` LoRA blocks of rank ``rank_per_block``."""

    def __init__(
        self, base: nn.Module, capacity: int, rank_per_block: int, scale: float = 1.0
    ) -> None:
        super().__init__()
        if capacity < 1 or rank_per_block < 1:
            raise ValueError(
                f"capacity and rank_per_block must be >= 1, got {capacity}, {rank_per_block}"
            )
        proj = arch.unwrap_projection(base)
        weight = proj.weight
        assert isinstance(weight, torch.Tensor)
        self.base = base
        self.d_in, self.d_out = arch.projection_in_out(proj)
        self.capacity = capacity
        self.rank = rank_per_block
        self.scale = float(scale)
        self._dtype = _lora_dtype(weight.dtype)
        # lora_A[b]: [r, d_in]; lora_B[b]: [d_out, r]. Created by _grow, frozen until
        # trainable_block(b).
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        # Blocks that take part in the forward pass; cleared blocks are skipped.
        self._active: list[bool] = []
        # The same Parameter objects as plain lists: indexing a ParameterList is slow
        # enough to show in a decode step. Blocks change only in place.
        self._a_params: list[nn.Parameter] = []
        self._b_params: list[nn.Parameter] = []

    def _grow(self, block: int) -> None:
        """Create the parameters of every block up to ``block`` (zeros, inactive)."""
        self._check_block(block)
        weight = arch.unwrap_projection(self.base).weight
        assert isinstance(weight, torch.Tensor)
        while len(self._active) <= block:
            a = nn.Parameter(
                torch.zeros(self.rank, self.d_in, dtype=self._dtype, device=weight.device),
                requires_grad=False,
            )
            b = nn.Parameter(
                torch.zeros(self.d_out, self.rank, dtype=self._dtype, device=weight.device),
                requires_grad=False,
            )
            self.lora_A.append(a)
            self.lora_B.append(b)
            self._a_params.append(a)
            self._b_params.append(b)
            self._active.append(False)

    @property
    def allocated(self) -> int:
        """Blocks whose parameters exist (the highest block id used, plus one)."""
        return len(self._active)

    # --- introspection ---------------------------------------------------------------

    @property
    def r_total(self) -> int:
        """The rank of the allocated blocks together (``allocated * rank``)."""
        return self.allocated * self.rank

    @property
    def block_nbytes(self) -> int:
        """Bytes of LoRA weights one block holds in this projection."""
        element = torch.empty((), dtype=self._dtype).element_size()
        return self.rank * (self.d_in + self.d_out) * element

    def full_A(self) -> torch.Tensor:
        """The partitioned ``A`` ``[r_total, d_in]`` of the allocated blocks (a copy)."""
        return torch.cat([*self.lora_A, self._zeros(0, self.d_in)], dim=0)

    def full_B(self) -> torch.Tensor:
        """The partitioned ``B`` ``[d_out, r_total]`` of the allocated blocks (a copy)."""
        return torch.cat([*self.lora_B, self._zeros(self.d_out, 0)], dim=1)

    def _zeros(self, rows: int, cols: int) -> torch.Tensor:
        weight = arch.unwrap_projection(self.base).weight
        assert isinstance(weight, torch.Tensor)
        return torch.zeros(rows, cols, dtype=self._dtype, device=weight.device)

    def is_active(self, block: int) -> bool:
        self._check_block(block)
        return block < self.allocated and self._active[block]

    def _check_block(self, block: int) -> None:
        if not 0 <= block < self.capacity:
            raise IndexError(f"block {block} out of range for capacity {self.capacity}")

    # --- block lifecycle -------------------------------------------------------------

    @torch.no_grad()
    def init_block(self, block: int, seed: int) -> None:
        """LoRA's init: A uniform in +-1/sqrt(d_in) (kaiming, a=sqrt(5)), B zeros."""
        self._grow(block)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        bound = 1.0 / math.sqrt(self.d_in)
        a = torch.empty(self.rank, self.d_in, dtype=self.lora_A[block].dtype)
        a.uniform_(-bound, bound, generator=gen)
        self.lora_A[block].copy_(a)
        self.lora_B[block].zero_()
        self._active[block] = True

    @torch.no_grad()
    def clear_block(self, block: int) -> None:
        """Zero the block and stop applying it: routed rows get the base output exactly."""
        self._check_block(block)
        if block >= self.allocated:
            return
        self.lora_A[block].zero_()
        self.lora_B[block].zero_()
        self._active[block] = False

    def block_state(self, block: int) -> dict[str, torch.Tensor]:
        """``{"lora_A": [r, d_in], "lora_B": [d_out, r]}``, detached CPU copies."""
        self._grow(block)
        return {
            "lora_A": self.lora_A[block].detach().to("cpu", copy=True),
            "lora_B": self.lora_B[block].detach().to("cpu", copy=True),
        }

    @torch.no_grad()
    def load_block_state(self, block: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load what ``block_state`` returned (shapes checked) and activate the block."""
        self._grow(block)
        for key, params in (("lora_A", self.lora_A), ("lora_B", self.lora_B)):
            target = params[block]
            value = tensors[key]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"{key} for block {block} has shape {tuple(value.shape)}, "
                    f"expected {tuple(target.shape)}"
                )
            target.copy_(value.to(device=target.device, dtype=target.dtype))
        self._active[block] = True

    @contextmanager
    def trainable_block(self, block: int) -> Iterator[list[nn.Parameter]]:
        """Unfreeze block ``block`` only; yields its ``[A_b, B_b]`` for the optimizer.

        Every other block's parameters keep ``requires_grad=False`` and are not
        yielded, so they get no gradient and no optimizer can change them. The
        block is activated (it must be applied for its loss to depend on it).
        """
        self._grow(block)
        params = [self.lora_A[block], self.lora_B[block]]
        self._active[block] = True
        for p in params:
            p.requires_grad_(True)
        try:
            yield params
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None

    # --- forward ---------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [batch, seq, d_in] (or [batch, d_in]); out: same leading dims, d_out.
        out: torch.Tensor = self.base(x)
        routes = current_routes()
        if routes is None:
            return out
        if len(routes) != x.shape[0]:
            raise ValueError(
                f"{len(routes)} routes for a batch of {x.shape[0]} rows "
                "(route_rows needs one entry per batch row)"
            )
        rows: list[int] = []
        picked: list[int] = []
        for row, block in enumerate(routes):
            if block is None:
                continue
            self._check_block(block)
            if block < len(self._active) and self._active[block]:
                rows.append(row)
                picked.append(block)
        if not rows:
            return out
        return self._add_blocks(x, out, rows, picked)

    def _add_blocks(
        self, x: torch.Tensor, out: torch.Tensor, rows: list[int], picked: list[int]
    ) -> torch.Tensor:
        """``out`` with row ``rows[i]`` plus block ``picked[i]``'s update, in one batched matmul."""
        idx = torch.tensor(rows, device=x.device)
        a = torch.stack([self._a_params[k] for k in picked])  # [n, r, d_in]
        b = torch.stack([self._b_params[k] for k in picked])  # [n, d_out, r]
        xb = x.index_select(0, idx).to(a.dtype)  # [n, ..., d_in]
        flat = xb.reshape(len(rows), -1, self.d_in)  # [n, S, d_in]
        hidden = torch.bmm(flat, a.transpose(1, 2))  # [n, S, r]
        delta = torch.bmm(hidden, b.transpose(1, 2)) * self.scale  # [n, S, d_out]
        delta = delta.reshape(*xb.shape[:-1], self.d_out)  # [n, ..., d_out]
        updated = out.index_select(0, idx) + delta.to(out.dtype)
        # Out of place: rows not in idx keep the base output's exact values.
        return out.index_copy(0, idx, updated)


# --- installing into a model -----------------------------------------------------------


def install_block_lora(
    model: nn.Module,
    layers: Sequence[int],
    capacity: int,
    rank_per_block: int,
    *,
    role: arch.Role = "mlp_out",
    scale: float = 1.0,
) -> dict[str, BlockLoraProjection]:
    """Wrap ``role`` (default the MLP output projection) in each of ``layers``.

    Returns ``{dotted name: layer}``; the model's own modules are replaced in
    place and restored by :func:`remove_block_lora`.
    """
    names = arch.lora_target_modules(model, list(layers), role)
    installed: dict[str, BlockLoraProjection] = {}
    try:
        for name in names:
            original = arch.get_module(model, name)
            if isinstance(original, BlockLoraProjection):
                raise ValueError(f"block LoRA is already installed at '{name}'")
            wrapper = BlockLoraProjection(original, capacity, rank_per_block, scale)
            _set_module(model, name, wrapper)
            installed[name] = wrapper
    except Exception:
        remove_block_lora(model, installed)
        raise
    return installed


def remove_block_lora(model: nn.Module, installed: Mapping[str, BlockLoraProjection]) -> None:
    """Put the original projection modules back (the same objects, untouched)."""
    for name, wrapper in installed.items():
        current = arch.get_module(model, name)
        if current is not wrapper:
            raise ValueError(f"module at '{name}' is not the installed block LoRA layer")
        _set_module(model, name, wrapper.base)


def _set_module(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = arch.get_module(model, parent_name) if parent_name else model
    setattr(parent, child, module)


# --- whole-block helpers over every installed layer --------------------------------------


def block_memory_bytes(installed: Mapping[str, BlockLoraProjection]) -> int:
    """Bytes one block takes across all installed projections."""
    return sum(layer.block_nbytes for layer in installed.values())


def init_block(installed: Mapping[str, BlockLoraProjection], block: int, seed: int) -> None:
    """Initialise ``block`` in every layer; layer k uses seed ``seed * 1009 + k``."""
    for k, layer in enumerate(installed.values()):
        layer.init_block(block, seed * 1009 + k)


def clear_block(installed: Mapping[str, BlockLoraProjection], block: int) -> None:
    """Zero and deactivate ``block`` in every layer."""
    for layer in installed.values():
        layer.clear_block(block)


def block_state(
    installed: Mapping[str, BlockLoraProjection], block: int
) -> dict[str, torch.Tensor]:
    """``{"<name>.lora_A": ..., "<name>.lora_B": ...}`` for ``block``, safetensors-ready."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in installed.items():
        for key, tensor in layer.block_state(block).items():
            state[f"{name}.{key}"] = tensor.contiguous()
    return state


def load_block_state(
    installed: Mapping[str, BlockLoraProjection], block: int, state: Mapping[str, torch.Tensor]
) -> None:
    """Load what :func:`block_state` returned into ``block`` of every layer."""
    for name, layer in installed.items():
        layer.load_block_state(block, {key: state[f"{name}.{key}"] for key in ("lora_A", "lora_B")})


@contextmanager
def trainable_block(
    installed: Mapping[str, BlockLoraProjection], block: int
) -> Iterator[list[nn.Parameter]]:
    """Unfreeze ``block`` in every layer; yields all its parameters for one optimizer."""
    with ExitStack() as stack:
        params: list[nn.Parameter] = []
        for layer in installed.values():
            params.extend(stack.enter_context(layer.trainable_block(block)))
        yield params
