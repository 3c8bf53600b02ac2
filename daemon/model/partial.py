"""Forward passes that stop once a given module has run.

Statistics read at a middle layer (the hook's key covariance, its gate calibration)
need nothing above it: not the later blocks, and above all not the LM head, whose
logits over the whole vocabulary cost more than a block on a small model with a
large vocabulary (SmolLM2: 49,152 x 576). :func:`forward_until` runs the model and
stops it by raising from a forward hook on the last module needed.
"""

from __future__ import annotations

from typing import Any

from torch import nn


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
