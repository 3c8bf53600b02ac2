"""Hook layers: bit-identity when idle, the fp32 delta, install/remove, the scope gate."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from daemon.editors.hook import gate
from daemon.editors.hook.gate import key_reference
from daemon.editors.hook.layer import (
    HookedProjection,
    calibrate_gates,
    install_hooks,
    remove_hooks,
)
from daemon.model import arch
from daemon.model.loading import LoadedModel, load_model
from daemon.world.build import load_world


@pytest.fixture(scope="module")
def llama(micro_world: Path) -> LoadedModel:
    return load_model(str(micro_world), device="cpu")


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    model.eval()  # type: ignore[no-untyped-call]
    return model


@pytest.fixture(scope="module")
def prompts(micro_world: Path) -> list[str]:
    """One training prompt per subject (distinct subjects, mixed relations)."""
    world = load_world(micro_world)
    examples = [p for p, _ in world.training_examples()]
    out: list[str] = []
    for subject in dict.fromkeys(f.subject for f in world.facts):
        out.extend([p for p in examples if subject in p][:1])
    return out


@pytest.fixture(scope="module")
def unrelated(micro_world: Path, prompts: list[str]) -> list[str]:
    """20 world prompts about other subjects under other templates than ``prompts[0]``.

    Same-template prompts about other subjects are NOT separable by a last-token key
    at layer 0 of the 2-layer micro world (see the module docstring of the layer).
    """
    edit = prompts[0]
    tail = " ".join(edit.split()[-2:])
    world = load_world(micro_world)
    subject = next(f.subject for f in world.facts if f.subject in edit)
    pool = [p for p, _ in world.training_examples() if subject not in p and not p.endswith(tail)]
    return pool[:: max(1, len(pool) // 20)][:20]


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids).logits
    return out


def _ids(lm: LoadedModel, text: str) -> torch.Tensor:
    ids: torch.Tensor = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    return ids


def _all_layers(model: nn.Module) -> list[int]:
    return list(range(arch.num_layers(model)))


def test_idle_hooks_are_bit_identical(llama: LoadedModel, gpt2: GPT2LMHeadModel) -> None:
    """Zero delta, or a delta behind a closed gate, leaves the logits bit-identical."""
    cases: list[tuple[nn.Module, torch.Tensor]] = [
        (llama.model, _ids(llama, "The capital of nowhere is")),
        (gpt2, torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))),
    ]
    for model, ids in cases:
        before = _logits(model, ids)
        hooks = install_hooks(model, _all_layers(model))
        try:
            assert torch.equal(_logits(model, ids), before)
            for h in hooks.values():
                h.set_delta(torch.randn(h.d_out, h.d_in))
                h.add_keys(torch.randn(h.d_in, 2))
            assert torch.equal(_logits(model, ids), before)  # auto, uncalibrated: closed
            for h in hooks.values():
                h.gate_mode = "closed"
            assert torch.equal(_logits(model, ids), before)
        finally:
            remove_hooks(model, hooks)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_open_gate_adds_x_delta(kind: str) -> None:
    torch.manual_seed(0)
    base: nn.Module = nn.Linear(12, 5) if kind == "linear" else Conv1D(5, 12)  # type: ignore[no-untyped-call]
    hook = HookedProjection(base)
    assert (hook.d_in, hook.d_out) == (12, 5)
    delta = torch.randn(5, 12, dtype=torch.float64)
    hook.set_delta(delta)
    hook.gate_mode = "open"
    x = torch.randn(3, 4, 12)
    expected = base(x) + x @ delta.float().T
    torch.testing.assert_close(hook(x), expected, rtol=1e-5, atol=1e-5)
    hook.add_delta(delta)
    torch.testing.assert_close(hook(x), base(x) + 2 * x @ delta.float().T, rtol=1e-5, atol=1e-5)
    hook.reset()
    assert torch.equal(hook(x), base(x))


def test_bf16_keeps_base_dtype_and_fp32_delta(gpt2: GPT2LMHeadModel) -> None:
    model = copy.deepcopy(gpt2)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    hooks = install_hooks(model, [0, 1])
    for h in hooks.values():
        h.set_delta(torch.randn(h.d_out, h.d_in) * 0.01)
        h.gate_mode = "open"
        assert arch.projection_weight_out_in(h.base).dtype == torch.bfloat16
        assert h.delta.dtype == torch.float32
    logits = _logits(model, torch.arange(6).unsqueeze(0))
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()


def test_install_remove_restores_modules(llama: LoadedModel, gpt2: GPT2LMHeadModel) -> None:
    for model in (llama.model, gpt2):
        layers = _all_layers(model)
        originals = {i: arch.mlp_out_module(model, i) for i in layers}
        ids = torch.arange(1, 9).unsqueeze(0)
        before = _logits(model, ids)
        hooks = install_hooks(model, layers)
        for i in layers:
            assert arch.mlp_out_module(model, i) is hooks[i]
            assert hooks[i].base is originals[i]
            hooks[i].set_delta(torch.ones(hooks[i].d_out, hooks[i].d_in))
            hooks[i].gate_mode = "open"
        assert not torch.equal(_logits(model, ids), before)
        with pytest.raises(ValueError, match="already"):
            install_hooks(model, layers[:1])
        remove_hooks(model, hooks)
        for i in layers:
            assert arch.mlp_out_module(model, i) is originals[i]
        assert torch.equal(_logits(model, ids), before)


def test_state_dict_round_trip() -> None:
    hook = HookedProjection(nn.Linear(6, 4))
    hook.set_delta(torch.randn(4, 6))
    hook.add_shard()
    hook.set_delta(torch.randn(4, 6), shard=1)
    hook.add_keys(torch.randn(6, 3))
    hook.set_calibration(torch.randn(20, 6))
    hook.add_keys(torch.randn(6, 2), shard=1)
    fresh = HookedProjection(nn.Linear(6, 4))
    fresh.load_state_dict(hook.state_dict())
    for name, value in hook.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    assert fresh._has_delta and fresh.n_shards == 2
    assert fresh.key_shard.tolist() == [0, 0, 0, 1, 1]
    x = torch.randn(2, 5, 6)
    x[0, 1] = hook.keys[4]
    assert torch.equal(fresh(x), hook(x))
    assert hook.last_route is not None and int(hook.last_route[0, 1]) == 1


def _last_keys(lm: LoadedModel, hooks: dict[int, HookedProjection], text: str) -> None:
    """Store the projection input at the prompt's last token as an edit key, per hook."""
    seen: dict[int, torch.Tensor] = {}
    handles = [
        h.register_forward_pre_hook(lambda _m, a, i=i: seen.__setitem__(i, a[0].detach()))
        for i, h in hooks.items()
    ]
    _logits(lm.model, _ids(lm, text))
    for handle in handles:
        handle.remove()
    for i, h in hooks.items():
        h.add_keys(seen[i][0, -1:].T)


def _gated_edit(lm: LoadedModel, prompts: list[str]) -> tuple[dict[int, HookedProjection], str]:
    """Hooks on the default layers keyed on prompts[0], calibrated on other prompts."""
    model = lm.model
    layers = arch.default_hook_layers(model)
    hooks = install_hooks(model, layers)
    edit, calib = prompts[0], prompts[21:]
    _last_keys(lm, hooks, edit)
    batch = lm.tokenizer(calib, return_tensors="pt", padding=True)
    calibrate_gates(model, hooks, batch["input_ids"], batch["attention_mask"])
    for h in hooks.values():
        u = torch.randn(h.d_out, generator=torch.Generator().manual_seed(3))
        k = h.keys[0]
        h.set_delta(torch.outer(u * 50.0 / u.norm(), k / k.dot(k)))
    return hooks, edit


def test_gate_fires_on_key_prompt_only(
    llama: LoadedModel, prompts: list[str], unrelated: list[str]
) -> None:
    hooks, edit = _gated_edit(llama, prompts)
    probes = unrelated
    try:
        assert len(probes) == 20
        _logits(llama.model, _ids(llama, edit))
        for h in hooks.values():
            assert h.last_gate is not None and bool(h.last_gate[0, -1])
        false_positives = 0
        for text in probes:
            _logits(llama.model, _ids(llama, text))
            if any(h.last_gate is not None and bool(h.last_gate.any()) for h in hooks.values()):
                false_positives += 1
        assert false_positives <= 2, f"{false_positives} of {len(probes)} unrelated prompts fired"
    finally:
        remove_hooks(llama.model, hooks)


def test_generation_agrees_with_and_without_cache(llama: LoadedModel, prompts: list[str]) -> None:
    ids = _ids(llama, prompts[0])
    model: Any = llama.model
    gen = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": llama.tokenizer.pad_token_id}
    with torch.no_grad():
        base = model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
    hooks, _ = _gated_edit(llama, prompts)
    try:
        with torch.no_grad():
            cached = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=True, **gen)
            uncached = model.generate(
                ids, attention_mask=torch.ones_like(ids), use_cache=False, **gen
            )
        assert torch.equal(cached, uncached)
        assert not torch.equal(cached, base)  # the gated edit did change the answer
    finally:
        remove_hooks(model, hooks)


def test_key_reference_matches_a_naive_float64_loop() -> None:
    """Per-key mean/std of centred cosines, computed key by key in float64."""
    g = torch.Generator().manual_seed(5)
    tokens, keys, center = (
        torch.randn(30, 6, generator=g),
        torch.randn(4, 6, generator=g),
        torch.randn(6, generator=g),
    )
    mean, std = key_reference(tokens, keys, center)
    for j in range(4):
        cos = torch.stack(
            [
                torch.nn.functional.cosine_similarity(
                    (t - center).double(), (keys[j] - center).double(), dim=0
                )
                for t in tokens
            ]
        )
        torch.testing.assert_close(mean[j].double(), cos.mean(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(std[j].double(), cos.std(unbiased=False), rtol=1e-5, atol=1e-6)


def test_adding_keys_never_moves_an_earlier_keys_gate() -> None:
    """Each key's reference is its own: later keys leave the earlier references and gate alone."""
    g = torch.Generator().manual_seed(7)
    hook = HookedProjection(nn.Linear(16, 4))
    hook.set_delta(torch.randn(4, 16, generator=g))
    hook.set_calibration(torch.randn(200, 16, generator=g))
    first = torch.randn(16, 1, generator=g)
    hook.add_keys(first)
    ref = (hook.key_mean.clone(), hook.key_std.clone())
    x = first.T.unsqueeze(0)  # (1, 1, 16): the first key's own token
    assert bool(hook.gate(x).all())
    for _ in range(20):
        hook.add_keys(torch.randn(16, 25, generator=g))
    assert torch.equal(hook.key_mean[:1], ref[0]) and torch.equal(hook.key_std[:1], ref[1])
    assert bool(hook.gate(x).all())
    hook.remove_keys([0])
    assert hook.keys.shape[0] == 500 and hook.key_mean.shape[0] == 500


def _reference_route(hook: HookedProjection, x: torch.Tensor) -> torch.Tensor:
    """The gate rule on the full float32 cosine matrix, as written before the pre-filter."""
    xn = torch.nn.functional.normalize(x.float() - hook.center, dim=-1)
    kn = torch.nn.functional.normalize(hook.keys - hook.center, dim=-1)
    cos = xn @ kn.T
    z = (cos - hook.key_mean) / hook.key_std
    limit = max(float(hook.threshold), float(hook.threshold_floor))
    eligible = (z >= limit) & (cos >= hook.cos_floor)
    masked = torch.where(eligible, cos, torch.full_like(cos, float("-inf")))
    best, nearest = masked.amax(dim=-1), masked.argmax(dim=-1)
    closed = torch.full(x.shape[:-1], -1, dtype=torch.long)
    return torch.where(torch.isfinite(best), hook.key_shard[nearest], closed)


def _many_keys_hook(g: torch.Generator, d: int = 48, m: int = 300) -> HookedProjection:
    """A calibrated hook with ``m`` keys over three shards, deltas in every shard."""
    hook = HookedProjection(nn.Linear(d, 8))
    hook.set_calibration(torch.randn(400, d, generator=g) + 0.5)
    for s in range(3):
        if s:
            hook.add_shard()
        hook.set_delta(torch.randn(8, d, generator=g), shard=s)
        hook.add_keys(torch.randn(d, m // 3, generator=g), shard=s)
    return hook


def _near_keys(hook: HookedProjection, g: torch.Generator, n: int) -> torch.Tensor:
    """``(1, n, d)`` tokens: stored keys plus noise from none to drowning, and random ones."""
    pick = torch.randint(0, hook.keys.shape[0], (n,), generator=g)
    scale = torch.linspace(0.0, 3.0, n).unsqueeze(1)
    x = hook.keys[pick] + scale * torch.randn(n, hook.d_in, generator=g)
    x[::7] = torch.randn(len(range(0, n, 7)), hook.d_in, generator=g)
    return x.unsqueeze(0)


def test_prefiltered_gate_routes_as_the_full_float32_rule() -> None:
    """The bf16 pre-filter (where the CPU has it) changes no routing decision."""
    g = torch.Generator().manual_seed(11)
    hook = _many_keys_hook(g)
    x = _near_keys(hook, g, 600)
    for floor, z in ((0.7, 3.0), (0.5, 2.0), (0.9, 2.0), (-1.0, 2.0)):
        hook.cos_floor.fill_(floor)  # in place: the gate cache must notice
        hook.set_threshold(z)
        route = hook.route(x)
        assert torch.equal(route, _reference_route(hook, x)), (floor, z)
    assert 0 < int((route >= 0).sum()) < route.numel()
    cache = hook._gate_cache
    assert cache is not None
    assert (cache.prefilter is not None) == gate.bf16_dot_products(hook.keys.device)


def test_gate_follows_key_changes() -> None:
    """Adding, removing and re-referencing keys reach the cached gate tensors."""
    g = torch.Generator().manual_seed(12)
    hook = _many_keys_hook(g)
    x = _near_keys(hook, g, 300)
    before = hook.route(x)
    hook.remove_keys(range(0, 150))
    assert torch.equal(hook.route(x), _reference_route(hook, x))
    assert not torch.equal(hook.route(x), before)
    hook.add_keys(x[0, :40].T, shard=1)
    assert torch.equal(hook.route(x), _reference_route(hook, x))
    hook.set_calibration(torch.randn(300, hook.d_in, generator=g))
    assert torch.equal(hook.route(x), _reference_route(hook, x))


def test_keys_without_reference_never_fire_among_many() -> None:
    """Keys added before any calibration stay closed, with or without the pre-filter."""
    g = torch.Generator().manual_seed(13)
    hook = HookedProjection(nn.Linear(32, 4))
    hook.set_delta(torch.randn(4, 32, generator=g))
    keys = torch.randn(32, 100, generator=g)
    hook.add_keys(keys)
    x = keys.T.unsqueeze(0)
    assert bool((hook.route(x) == -1).all())
    assert torch.equal(hook(x), hook.base(x))


def test_routed_tokens_get_their_shards_delta() -> None:
    """Each routed token gets ``x @ delta[its shard].T``; the others the base output exactly."""
    g = torch.Generator().manual_seed(14)
    hook = _many_keys_hook(g)
    x = _near_keys(hook, g, 200)
    out = hook(x)
    route = hook.last_route
    assert route is not None and len(set(route[route >= 0].tolist())) == 3
    base = hook.base(x)
    for t in range(x.shape[1]):
        s = int(route[0, t])
        if s < 0:
            assert torch.equal(out[0, t], base[0, t]), t
        else:
            torch.testing.assert_close(out[0, t], base[0, t] + x[0, t] @ hook.delta[s].T)


def test_bf16_cosines_stay_within_the_prefilter_margin() -> None:
    """The bound the pre-filter's margin rests on, on unit vectors with outlier entries."""
    g = torch.Generator().manual_seed(15)
    a = torch.randn(200, 512, generator=g)
    b = torch.randn(300, 512, generator=g)
    a[:, :4] *= 30.0  # a few dominant dimensions, as MLP activations have
    b[:, :4] *= 30.0
    an = torch.nn.functional.normalize(a, dim=-1)
    bn = torch.nn.functional.normalize(b, dim=-1)
    exact = an.double() @ bn.double().T
    low = (an.bfloat16() @ bn.bfloat16().T).double()
    assert float((low - exact).abs().max()) < gate.PREFILTER_MARGIN / 2
