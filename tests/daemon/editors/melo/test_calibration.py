"""MELO's radius rule: a fixed-size prompt bank, topped up with the model's own prompts."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.editors.melo import calibration
from daemon.editors.melo.keys import KeyReader
from daemon.model.loading import LoadedModel


@pytest.mark.parametrize(
    ("text", "prompt"),
    [
        ("Acme is based in Paris. Acme was", "Acme is based in"),
        ("Jo works for  Initech\nand", "Jo works for"),
        ("Too short", None),
        ("One two three", "One two"),
    ],
)
def test_prompt_from_text_drops_the_last_word_of_the_first_sentence(
    text: str, prompt: str | None
) -> None:
    """Sampled text becomes a completion-style prompt; fewer than three words give none."""
    assert calibration.prompt_from_text(text) == prompt


def test_bank_is_deterministic_and_of_fixed_size(loaded: LoadedModel) -> None:
    """Sampling is seeded; given prompts come first and are topped up to the bank size."""
    given = ["Alpha beta gamma", "Alpha beta gamma", "Delta epsilon"]
    one = calibration.calibration_bank(loaded.model, loaded.tokenizer, given, size=24, seed=1)
    two = calibration.calibration_bank(loaded.model, loaded.tokenizer, given, size=24, seed=1)
    assert one == two
    assert len(one) == 24 and len(set(one)) == 24
    assert one[:2] == ["Alpha beta gamma", "Delta epsilon"]
    many = [f"prompt number {i}" for i in range(40)]
    sub = calibration.calibration_bank(loaded.model, loaded.tokenizer, many, size=24, seed=1)
    assert len(sub) == 24 and set(sub) <= set(many)


def test_radius_is_a_fraction_of_the_median_nearest_distance(loaded: LoadedModel) -> None:
    """radius_from_keys scales with the fraction and rejects a bank of identical keys."""
    bank = calibration.calibration_bank(loaded.model, loaded.tokenizer, (), size=32)
    reader = KeyReader(loaded.model, loaded.tokenizer, 0)
    try:
        keys = reader(bank)
    finally:
        reader.close()
    half = calibration.radius_from_keys(keys, 0.5)
    assert 0 < half < 2.0  # unit-norm keys: distances lie in [0, 2]
    assert calibration.radius_from_keys(keys, 1.0) == pytest.approx(2 * half)
    with pytest.raises(ValueError):
        calibration.radius_from_keys(np.ones((4, 3)), 0.5)


def test_calibrate_radius_lies_between_intra_and_inter_cluster_distances() -> None:
    """On well-separated synthetic facts with rephrasings, the radius separates the two."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 32)) * 10.0
    keys = np.repeat(centres, 6, axis=0) + rng.normal(scale=0.2, size=(120, 32))
    groups = np.repeat(np.arange(20), 6)
    radius = calibration.calibrate_radius(keys, groups=groups)
    intra = max(
        float(np.linalg.norm(keys[groups == g] - centres[g], axis=1).max()) for g in range(20)
    )
    diffs = centres[:, None, :] - centres[None, :, :]
    inter = np.sqrt((diffs**2).sum(-1))[~np.eye(20, dtype=bool)].min()
    assert intra < radius < inter
    # pure: same input, same radius
    assert calibration.calibrate_radius(keys, groups=groups) == radius
    assert calibration.calibrate_radius(centres) == pytest.approx(
        0.5 * np.median(np.sort(np.sqrt((diffs**2).sum(-1)), axis=1)[:, 1])
    )
    with pytest.raises(ValueError, match="two distinct groups"):
        calibration.calibrate_radius(keys, groups=np.zeros(120))
