"""MELO's block LoRA layer and per-request routing: exactness, isolation, concurrency."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from daemon.editors.melo import layer as bl
from daemon.editors.melo.layer import BlockLoraProjection, install_block_lora, remove_block_lora
from daemon.editors.melo.routing import current_routes, route_rows
from daemon.model import arch
from daemon.model.loading import LoadedModel, load_model

CAPACITY, RANK = 4, 2
PROMPTS = ["The capital of", "A red", "Who wrote the"]


@pytest.fixture(scope="module")
def llama(micro_world: Path) -> LoadedModel:
    return load_model(str(micro_world), device="cpu")


def _tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    model: nn.Module = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _llama_batch(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    enc = loaded.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _gpt2_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 100, (3, 6), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(params=["llama", "gpt2"])
def model_and_batch(
    request: pytest.FixtureRequest, micro_world: Path
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    if request.param == "llama":
        loaded: LoadedModel = request.getfixturevalue("llama")
        return loaded.model, _llama_batch(loaded)
    return _tiny_gpt2(), _gpt2_batch()


@pytest.fixture
def installed_llama(llama: LoadedModel) -> Iterator[dict[str, BlockLoraProjection]]:
    installed = install_block_lora(
        llama.model, arch.default_melo_layers(llama.model), CAPACITY, RANK
    )
    try:
        yield installed
    finally:
        remove_block_lora(llama.model, installed)


def _randomise(installed: dict[str, BlockLoraProjection], block: int, seed: int) -> None:
    """Init ``block`` and give it a non-zero B large enough to change the logits."""
    bl.init_block(installed, block, seed)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for layer in installed.values():
            b = layer.lora_B[block]
            b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype) * 2.0)


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(**batch).logits  # [B, T, V]
    return logits


def _generate(model: nn.Module, batch: dict[str, torch.Tensor], tokens: int = 5) -> Any:
    with torch.no_grad():
        return cast(Any, model).generate(
            **batch,
            max_new_tokens=tokens,
            do_sample=False,
            use_cache=True,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )


def _row(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k: v[i : i + 1] for k, v in batch.items()}


# --- exactness for rows that are not routed -------------------------------------------


def test_unrouted_rows_are_bit_identical_to_base(
    model_and_batch: tuple[nn.Module, dict[str, torch.Tensor]],
) -> None:
    model, batch = model_and_batch
    base = _logits(model, batch)
    installed = install_block_lora(model, arch.default_melo_layers(model), CAPACITY, RANK)
    try:
        for b in range(3):
            _randomise(installed, b, seed=b)
        assert torch.equal(_logits(model, batch), base)  # outside any routing context
        with route_rows([None, None, None]):
            assert torch.equal(_logits(model, batch), base)
        with route_rows([None, 1, None]):
            routed = _logits(model, batch)
        assert torch.equal(routed[0], base[0])
        assert torch.equal(routed[2], base[2])
        assert not torch.allclose(routed[1], base[1])
        with route_rows([3, 3, 3]):  # never initialised: inactive, skipped
            assert torch.equal(_logits(model, batch), base)
        bl.clear_block(installed, 1)
        with route_rows([None, 1, None]):
            assert torch.equal(_logits(model, batch), base)
    finally:
        remove_block_lora(model, installed)
    assert torch.equal(_logits(model, batch), base)


# --- batched rows with different blocks ------------------------------------------------


def test_batch_with_mixed_routes_matches_each_row_alone(
    llama: LoadedModel, installed_llama: dict[str, BlockLoraProjection]
) -> None:
    model, batch = llama.model, _llama_batch(llama)
    _randomise(installed_llama, 0, seed=10)
    _randomise(installed_llama, 1, seed=11)
    routes = [0, 1, None]
    with route_rows(routes):
        batched = _logits(model, batch)
        batched_gen = _generate(model, batch)
    for i, block in enumerate(routes):
        with route_rows([block]):
            alone = _logits(model, _row(batch, i))
            alone_gen = _generate(model, _row(batch, i))
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-4, atol=1e-4)
        assert torch.equal(batched_gen.sequences[i : i + 1], alone_gen.sequences)
        for step_b, step_a in zip(batched_gen.logits, alone_gen.logits, strict=True):
            torch.testing.assert_close(step_b[i : i + 1], step_a, rtol=1e-4, atol=1e-4)
    # The route is frozen across decode steps: every step's logits depend on the block.
    plain = _generate(model, _row(batch, 0))
    with route_rows([0]):
        routed = _generate(model, _row(batch, 0))
    for step_p, step_r in zip(plain.logits, routed.logits, strict=True):
        assert not torch.allclose(step_p, step_r)


def test_route_count_must_match_batch(
    llama: LoadedModel, installed_llama: dict[str, BlockLoraProjection]
) -> None:
    batch = _llama_batch(llama)
    with route_rows([0]), pytest.raises(ValueError, match="routes for a batch of 3"):
        _logits(llama.model, batch)
    with route_rows([CAPACITY, None, None]), pytest.raises(IndexError):
        _logits(llama.model, batch)
    with pytest.raises(ValueError):
        route_rows([-1]).__enter__()


# --- concurrency --------------------------------------------------------------------


def test_concurrent_threads_see_their_own_routes(
    llama: LoadedModel, installed_llama: dict[str, BlockLoraProjection]
) -> None:
    model, batch = llama.model, _llama_batch(llama)
    _randomise(installed_llama, 0, seed=20)
    _randomise(installed_llama, 2, seed=22)
    jobs = {"a": (0, _row(batch, 0)), "b": (2, _row(batch, 0)), "c": (None, _row(batch, 0))}
    expected = {}
    for name, (block, inputs) in jobs.items():
        with route_rows([block]):
            expected[name] = _generate(model, inputs)
    assert not torch.allclose(expected["a"].logits[0], expected["b"].logits[0])

    results: dict[str, list[Any]] = {name: [] for name in jobs}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def work(name: str) -> None:
        try:
            block, inputs = jobs[name]
            barrier.wait()
            with route_rows([block]):
                for _ in range(3):
                    results[name].append(_generate(model, inputs))
            assert current_routes() is None
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(name,)) for name in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name, outs in results.items():
        assert len(outs) == 3
        for out in outs:
            assert torch.equal(out.sequences, expected[name].sequences)
            for got, want in zip(out.logits, expected[name].logits, strict=True):
                assert torch.equal(got, want)


# --- training one block --------------------------------------------------------------


def test_training_one_block_changes_only_that_block(
    llama: LoadedModel, installed_llama: dict[str, BlockLoraProjection]
) -> None:
    model, tok = llama.model, llama.tokenizer
    for b in (0, 1):
        _randomise(installed_llama, b, seed=30 + b)
    bl.init_block(installed_llama, 2, seed=32)
    before = {b: bl.block_state(installed_llama, b) for b in range(CAPACITY)}
    base_params = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}

    prompt = tok("The capital of", return_tensors="pt")["input_ids"]  # [1, P]
    target = tok(" Zorblax", add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([prompt, target], dim=1)  # [1, P + T]
    labels = ids.clone()
    labels[:, : prompt.shape[1]] = -100

    losses = []
    with bl.trainable_block(installed_llama, 2) as params, route_rows([2]):
        assert len(params) == 2 * len(installed_llama)
        opt = torch.optim.AdamW(params, lr=5e-2, weight_decay=0.1)
        for _ in range(8):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses

    after = {b: bl.block_state(installed_llama, b) for b in range(CAPACITY)}
    for b in (0, 1, 3):
        for key, value in before[b].items():
            assert torch.equal(after[b][key], value), (b, key)
    assert any(not torch.equal(after[2][k], before[2][k]) for k in before[2])
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_params[n]), n
        assert not p.requires_grad, n  # everything frozen again after training


# --- install / remove / state --------------------------------------------------------


def test_install_remove_restores_exact_modules(
    model_and_batch: tuple[nn.Module, dict[str, torch.Tensor]],
) -> None:
    model, batch = model_and_batch
    layers = arch.default_melo_layers(model)
    names = arch.lora_target_modules(model, layers)
    originals = {n: arch.get_module(model, n) for n in names}
    base = _logits(model, batch)
    installed = install_block_lora(model, layers, CAPACITY, RANK)
    assert set(installed) == set(names)
    with pytest.raises(ValueError, match="already installed"):
        install_block_lora(model, layers, CAPACITY, RANK)
    for n in names:
        assert arch.get_module(model, n) is installed[n]
        assert installed[n].base is originals[n]
        d_in, d_out = arch.projection_in_out(originals[n])
        assert installed[n].block_nbytes == RANK * (d_in + d_out) * 4
        assert installed[n].full_A().shape == (0, d_in)  # blocks are created on demand
        installed[n].init_block(CAPACITY - 1, seed=1)
        assert installed[n].full_A().shape == (CAPACITY * RANK, d_in)
        assert installed[n].full_B().shape == (d_out, CAPACITY * RANK)
    assert bl.block_memory_bytes(installed) == sum(i.block_nbytes for i in installed.values())
    _randomise(installed, 0, seed=40)
    remove_block_lora(model, installed)
    for n in names:
        assert arch.get_module(model, n) is originals[n]
    with route_rows([0, 0, 0]):
        assert torch.equal(_logits(model, batch), base)


def test_block_state_round_trips(
    llama: LoadedModel, installed_llama: dict[str, BlockLoraProjection]
) -> None:
    model, batch = llama.model, _llama_batch(llama)
    base = _logits(model, batch)
    _randomise(installed_llama, 1, seed=50)
    with route_rows([1, 1, None]):
        edited = _logits(model, batch)
    state = bl.block_state(installed_llama, 1)
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in state.values())
    bl.clear_block(installed_llama, 1)
    with route_rows([1, 1, None]):
        assert torch.equal(_logits(model, batch), base)
    bl.load_block_state(installed_llama, 3, state)  # into another slot
    with route_rows([3, 3, None]):
        assert torch.equal(_logits(model, batch), edited)
    one = next(iter(installed_llama.values()))
    bad = {"lora_A": torch.zeros(RANK + 1, one.d_in), "lora_B": torch.zeros(one.d_out, RANK)}
    with pytest.raises(ValueError, match="shape"):
        one.load_block_state(0, bad)


def test_blocks_are_created_on_demand_up_to_the_capacity(
    model_and_batch: tuple[nn.Module, dict[str, torch.Tensor]],
) -> None:
    """A huge capacity costs nothing until used; unused blocks route to the base output."""
    model, batch = model_and_batch
    base = _logits(model, batch)
    installed = install_block_lora(model, arch.default_melo_layers(model), 100_000, RANK)
    try:
        assert all(layer.allocated == 0 for layer in installed.values())
        with route_rows([7, None, 99_999]):
            assert torch.equal(_logits(model, batch), base)
        bl.init_block(installed, 2, seed=3)
        assert all(layer.allocated == 3 for layer in installed.values())
        assert all(not layer.is_active(1) and layer.is_active(2) for layer in installed.values())
        with pytest.raises(IndexError, match="out of range"):
            bl.init_block(installed, 100_000, seed=3)
    finally:
        remove_block_lora(model, installed)
