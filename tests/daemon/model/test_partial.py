"""forward_until: the forward stops once the named module has run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from daemon.model import arch
from daemon.model.partial import forward_until
from tests.daemon.model.conftest import tiny_llama


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
