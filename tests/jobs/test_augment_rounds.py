"""``medvae augment`` samples in rounds until the requested images passed the privacy filter."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from medvae.jobs.augment import Draw, _draw_until_kept
from medvae.synth.sample import Sampling, round_seed


@pytest.fixture
def one_in_three(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Samples carry their seed's low byte and their position; the filter passes every third position."""
    calls: list[tuple[int, int]] = []

    def sample(model: Any, n: int, *, label_index: Any, seed: int, sampler: Any, detail: Any) -> np.ndarray:
        calls.append((seed, n))
        out = np.zeros((n, 2, 2), np.uint8)
        out[:, 0, 0], out[:, 0, 1] = seed % 251, np.arange(n) % 256
        return out

    def privacy(batch: np.ndarray, train: np.ndarray, threshold: float) -> Any:
        return SimpleNamespace(keep=batch[:, 0, 1] % 3 == 0, distances=np.ones(len(batch)))

    monkeypatch.setattr("medvae.synth.sample.sample_images", sample)
    monkeypatch.setattr("medvae.synth.privacy.privacy_filter", privacy)
    return calls


def test_rounds_reach_the_count_and_give_the_same_rows_twice(one_in_three: list[tuple[int, int]]) -> None:
    draw = Draw("normal", 0, 10, seed=1234)
    train = np.zeros((1, 2, 2), np.uint8)
    images, ks, read = _draw_until_kept(None, draw, Sampling(None, None), train, 0.1, max_draws=8.0)
    assert len(images) == len(ks) == 10 and len(set(ks)) == 10
    assert len(one_in_three) >= 2 and one_in_three[0] == (1234, 10)  # round 0: the label's own seed
    assert one_in_three[1][0] == round_seed(1234, 1) != 1234
    # Only the samples up to the tenth kept one count as read: 4 kept of round 0's 10, then 6 more.
    assert ks[:4] == [0, 3, 6, 9] and read == ks[-1] + 1
    again = _draw_until_kept(None, draw, Sampling(None, None), train, 0.1, max_draws=8.0)
    assert again[1] == ks and all(np.array_equal(a, b) for a, b in zip(again[0], images, strict=True))


def test_the_draws_stop_at_the_cap_and_the_shortfall_shows(one_in_three: list[tuple[int, int]]) -> None:
    draw = Draw("normal", 0, 10, seed=7)
    _, ks, read = _draw_until_kept(
        None, draw, Sampling(None, None), np.zeros((1, 2, 2), np.uint8), 0.1, max_draws=1.5
    )
    assert read == 15 and len(ks) < 10  # 15 samples at most; positions 0, 3, 6, 9 of round 0, then more
