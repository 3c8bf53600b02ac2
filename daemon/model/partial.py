"""Forward passes over part of the model: stopping after a block, or starting above one.

Statistics read at a middle layer (the hook's key covariance, its gate calibration)
need nothing above it: not the later blocks, and above all not the LM head, whose
logits over the whole vocabulary cost more than a block on a small model with a
large vocabulary (SmolLM2: 49,152 x 576). :func:`forward_until` runs the model and
stops it by raising from a forward hook on the last module needed.

An optimisation that changes the residual stream at block ``L``'s output and runs
the same batch again and again (the hook's target values) needs nothing below that
block after the first pass: :func:`replaying` swaps blocks ``0..L`` for stand-ins
that hand on block ``L``'s recorded output, so each later pass costs the blocks above
``L`` only (on SmolLM2 with the hook at layers 4-11, 18 of 30 blocks). The model's own
forward still runs around them (embeddings, masks, rotary tables), so every
architecture is replayed without knowing how it builds those.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from daemon.model import arch


class _Reached(Exception):
    """Raised by the stop hook: the module of interest has run."""


def forward_until(model: nn.Module, last: nn.Module, **inputs: Any) -> None:
    """Run ``model(**inputs)`` until ``last`` has finished its forward, then stop.

    Forward hooks on ``last`` and the modules below it have run when this returns;
    nothing above it has. Raises ``RuntimeError`` when the forward never reaches
    ``last`` (it is not part of this model's computation).
    """

    def stop(_module: nn.Module, _args: Any, _output: Any) -> None:
        raise _Reached

    handle = last.register_forward_hook(stop)
    try:
        model(**inputs)
    except _Reached:
        return
    finally:
        handle.remove()
    raise RuntimeError(f"the forward pass never reached {type(last).__name__}")


class _PassOn(nn.Module):
    """A block's stand-in below the replayed one: hands its input on unchanged."""

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states: torch.Tensor, *_args: Any, **_kwargs: Any) -> Any:
        return (hidden_states,) if self.as_tuple else hidden_states


class _Replay(nn.Module):
    """The replayed block's stand-in: returns its recorded output, whatever it is given."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, hidden_states: torch.Tensor, *_args: Any, **_kwargs: Any) -> Any:
        recorded = self.output[0] if isinstance(self.output, tuple) else self.output
        if recorded.shape != hidden_states.shape:
            raise RuntimeError(
                f"replaying block output {tuple(recorded.shape)} for an input of "
                f"{tuple(hidden_states.shape)}: record it on the same batch"
            )
        return self.output


def record_block_output(model: nn.Module, layer: int, **inputs: Any) -> Any:
    """Block ``layer``'s output (as the block returns it, detached) for ``inputs``;
    the forward stops there (:func:`forward_until`)."""
    seen: dict[str, Any] = {}

    def grab(_module: nn.Module, _args: Any, output: Any) -> None:
        if isinstance(output, tuple):
            seen["out"] = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in output)
        else:
            seen["out"] = output.detach()

    block = arch.layer_block(model, layer)
    handle = block.register_forward_hook(grab)
    try:
        with torch.no_grad():
            forward_until(model, block, **inputs)
    finally:
        handle.remove()
    return seen["out"]


@contextmanager
def replaying(model: nn.Module, layer: int, output: Any) -> Iterator[None]:
    """While inside, forwards of ``model`` skip blocks ``0..layer`` and continue from
    block ``layer``'s ``output`` (from :func:`record_block_output` on the same inputs).

    Anything attached to block ``layer`` inside the context (a forward hook that
    changes its output) acts on the stand-in, so on the replayed output; the blocks
    below do not run, nor do their hooks. The blocks are put back on exit.
    """
    blocks = arch.get_module(model, arch.module_path(model, "layers"))
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"the model's blocks are a {type(blocks).__name__}, not a ModuleList")
    originals = [blocks[i] for i in range(layer + 1)]
    as_tuple = isinstance(output, tuple)
    for i in range(layer):
        blocks[i] = _PassOn(as_tuple)
    blocks[layer] = _Replay(output)
    try:
        yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
