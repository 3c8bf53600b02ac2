"""Covariance statistics on the micro world model: pad masking, budget, artefact, cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs

from daemon.editors.hook.stats import (
    StatsMeta,
    cached_covariance,
    collect_covariance,
    collect_covariance_counted,
    load_stats,
    save_stats,
)
from daemon.errors import CovarianceStatsError
from daemon.model import arch
from daemon.model.loading import LoadedModel, load_model
from daemon.world.build import load_world


@pytest.fixture(scope="module")
def loaded(micro_world: Path) -> LoadedModel:
    """The micro world model in float64, so batching differences show at 1e-10."""
    lm = load_model(str(micro_world), device="cpu")
    for p in lm.model.parameters():  # PreTrainedModel.to is awkwardly typed
        p.data = p.data.to(torch.float64)
    for b in lm.model.buffers():
        b.data = b.data.to(torch.float64) if b.is_floating_point() else b.data
    return lm


@pytest.fixture(scope="module")
def texts(micro_world: Path) -> list[str]:
    """A few dozen fact sentences of varied length, one much longer (forces heavy padding)."""
    facts = load_world(micro_world).facts[:30]
    out = [f"{f.subject} {f.relation.replace('_', ' ')} {f.object}." for f in facts]
    out[3] = " ".join(out[:8])
    return out


@pytest.fixture(scope="module")
def layers(loaded: LoadedModel) -> tuple[int, ...]:
    return arch.default_hook_layers(loaded.model)


def _meta(layers: tuple[int, ...], tokens: int, **changes: object) -> StatsMeta:
    meta = StatsMeta(
        model_id="micro",
        fingerprint="f" * 64,
        layers=layers,
        token_budget=10_000,
        token_count=tokens,
        dtype="float64",
        texts_sha256="t" * 64,
    )
    return dataclasses.replace(meta, **changes)  # type: ignore[arg-type]


def test_padding_and_batching_do_not_change_stats(
    loaded: LoadedModel, texts: list[str], layers: tuple[int, ...]
) -> None:
    """Unpadded (batch 1), mixed and one fully padded batch agree to 1e-10."""
    runs = [
        collect_covariance(
            loaded.model,
            loaded.tokenizer,
            texts,
            layers,
            token_budget=10_000,
            batch_size=b,
            progress=False,
        )
        for b in (1, 7, len(texts))
    ]
    for other in runs[1:]:
        for i in layers:
            torch.testing.assert_close(other[i], runs[0][i], rtol=0, atol=1e-10)


def test_stats_are_symmetric_psd_float64(
    loaded: LoadedModel, texts: list[str], layers: tuple[int, ...]
) -> None:
    """Each layer's C is float64, (d_in, d_in), symmetric and positive semi-definite."""
    stats = collect_covariance(
        loaded.model, loaded.tokenizer, texts, layers, token_budget=10_000, progress=False
    )
    d_in = arch.projection_in_out(arch.mlp_out_module(loaded.model, layers[0]))[0]
    assert sorted(stats) == sorted(layers)
    for c in stats.values():
        assert c.dtype == torch.float64
        assert c.shape == (d_in, d_in)
        torch.testing.assert_close(c, c.T, rtol=0, atol=1e-12)
        assert float(torch.linalg.eigvalsh(c).min()) > -1e-10


def test_token_budget_is_respected(
    loaded: LoadedModel, texts: list[str], layers: tuple[int, ...]
) -> None:
    """Exactly token_budget tokens are used, the first ones in reading order, whatever the batch."""
    model, tok = loaded.model, loaded.tokenizer
    _, total = collect_covariance_counted(
        model, tok, texts, layers, token_budget=10**9, progress=False
    )
    budget = total // 3
    a, n_a = collect_covariance_counted(
        model, tok, texts, layers, token_budget=budget, batch_size=1, progress=False
    )
    b, n_b = collect_covariance_counted(
        model, tok, texts, layers, token_budget=budget, batch_size=8, progress=False
    )
    assert n_a == n_b == budget
    for i in layers:
        torch.testing.assert_close(a[i], b[i], rtol=0, atol=1e-10)


def test_save_load_round_trip(tmp_path: Path) -> None:
    """Saved stats load back bit-identical, with a versioned manifest beside them."""
    g = torch.Generator().manual_seed(0)
    stats = {1: torch.randn(5, 5, generator=g, dtype=torch.float64), 2: torch.eye(5)}
    meta = _meta((1, 2), 123)
    path = save_stats(tmp_path / "c.safetensors", stats, meta)
    assert path.with_suffix(".json").is_file()
    back = load_stats(path, meta)
    assert torch.equal(back[1], stats[1])
    assert torch.equal(back[2], stats[2].double())


def test_corrupt_or_mismatched_artefact_is_rejected(tmp_path: Path) -> None:
    """A flipped byte or a different layer set / token count raises, naming the file."""
    stats = {1: torch.eye(4, dtype=torch.float64)}
    meta = _meta((1,), 50)
    path = save_stats(tmp_path / "c.safetensors", stats, meta)
    for other in (_meta((2,), 50), _meta((1,), 51), _meta((1,), 50, model_id="other")):
        with pytest.raises(CovarianceStatsError, match=r"c\.safetensors"):
            load_stats(path, other)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CovarianceStatsError, match="checksum") as info:
        load_stats(path, meta)
    assert str(path) in str(info.value)


def test_cached_covariance_computes_once_then_reuses(
    loaded: LoadedModel, texts: list[str], layers: tuple[int, ...], tmp_path: Path
) -> None:
    """The first call computes and logs timings; the second reuses the artefact unchanged."""
    args = (tmp_path, loaded.model, loaded.tokenizer, texts, layers, 200, "micro")
    with capture_logs() as first:
        a = cached_covariance(*args, progress=False)
    with capture_logs() as second:
        b = cached_covariance(*args, progress=False)
    events = [e["event"] for e in first]
    assert "covariance_stats_computed" in events
    computed = next(e for e in first if e["event"] == "covariance_stats_computed")
    assert computed["tokens"] == 200
    assert computed["seconds"] >= 0
    assert [e["event"] for e in second] == ["covariance_stats_reused"]
    for i in layers:
        assert torch.equal(a[i], b[i])
    with capture_logs() as third:  # another budget is another artefact
        cached_covariance(*args[:5], 100, "micro", progress=False)
    assert "covariance_stats_computed" in [e["event"] for e in third]


def test_the_forward_stops_at_the_top_hook_layer(loaded: LoadedModel, texts: list[str]) -> None:
    """Nothing above the highest hook layer runs (no later block, no LM head), and the
    statistics equal those read from complete forward passes; without a progress bar,
    progress is logged."""
    model = loaded.model
    n = arch.num_layers(model)
    calls: list[str] = []
    above = [arch.layer_block(model, i) for i in range(1, n)] + [arch.get_module(model, "lm_head")]
    handles = [m.register_forward_pre_hook(lambda *_: calls.append("ran")) for m in above]
    try:
        with capture_logs() as logs, pytest.MonkeyPatch.context() as mp:
            mp.setattr("daemon.editors.hook.stats.PROGRESS_EVERY_S", 0.0)
            stats, tokens = collect_covariance_counted(
                model, loaded.tokenizer, texts, [0], token_budget=200, progress=False
            )
    finally:
        for h in handles:
            h.remove()
    assert calls == []
    assert [e["tokens"] for e in logs if e["event"] == "covariance_progress"][-1] == tokens
    full: list[torch.Tensor] = []
    hook = arch.mlp_out_module(model, 0).register_forward_pre_hook(
        lambda _m, args: full.append(args[0].detach())
    )
    try:
        with torch.no_grad():
            for text in texts:
                model(**loaded.tokenizer([text], return_tensors="pt"))
    finally:
        hook.remove()
    keys = torch.cat([k[0] for k in full]).to(torch.float64)[:tokens]
    torch.testing.assert_close(stats[0], keys.T @ keys / tokens, rtol=1e-9, atol=1e-12)
