"""Tests for the shift-aware split (:func:`medvae.data.splits.cohort_split`)."""

from __future__ import annotations

import numpy as np
import pytest

from medvae.data.splits import check_no_leak, cohort_split


def _cohort(n_im: int = 100, n_n2: int = 60, n_p: int = 150) -> tuple[np.ndarray, ...]:
    """Kermany-like rows: IM normals, a NORMAL2 batch of normals, pneumonia persons; 1-3 images each."""
    rng = np.random.default_rng(0)
    labels, groups, batches, orders = [], [], [], []
    for fam, label, n in (("IM", "normal", n_im), ("NORMAL2", "normal", n_n2), ("person", "pneumonia", n_p)):
        for p in range(n):
            for _ in range(int(rng.integers(1, 4))):
                labels.append(label)
                groups.append(f"{fam}{p}")
                batches.append("NORMAL2" if fam == "NORMAL2" else "")
                orders.append(p + 1)
    return tuple(np.array(v) for v in (labels, groups, batches, orders))


def test_a_held_out_batch_is_all_test_and_the_earliest_patients_of_the_rest_are_test() -> None:
    labels, groups, batches, orders = _cohort()
    a = cohort_split(labels, groups, batches, orders, test_fraction=0.2, val_fraction=0.1, seed=0)
    check_no_leak(groups, a)
    assert (a[batches == "NORMAL2"] == "test").all()  # hold_out=None: every named batch
    for label in ("normal", "pneumonia"):
        m = (batches == "") & (labels == label)
        test_orders, other_orders = orders[m & (a == "test")], orders[m & (a != "test")]
        assert test_orders.max() < other_orders.min()  # an earlier block, not a random sample
        assert abs((a[m] == "test").mean() - 0.2) < 0.05
        assert abs((a[m] == "val").mean() - 0.1) < 0.05
    # Deterministic; the seed moves val only, never the test set.
    assert np.array_equal(a, cohort_split(labels, groups, batches, orders, seed=0))
    b = cohort_split(labels, groups, batches, orders, seed=1)
    assert np.array_equal(a == "test", b == "test") and not np.array_equal(a, b)


def test_hold_out_names_the_batches_and_an_empty_tuple_holds_none_out() -> None:
    labels, groups, batches, orders = _cohort()
    a = cohort_split(labels, groups, batches, orders, hold_out=())
    n2 = batches == "NORMAL2"
    assert 0.1 < (a[n2] == "test").mean() < 0.3  # the ID-block rule, like every other batch
    assert orders[n2 & (a == "test")].max() < orders[n2 & (a != "test")].min()


def test_unknown_orders_are_placed_by_hash_in_their_own_stratum() -> None:
    labels, groups, batches, orders = _cohort(n_n2=0)
    orders = orders.copy()
    unknown = np.char.startswith(groups, "person") & (np.char.str_len(groups) % 2 == 0)
    orders[unknown] = -1
    a = cohort_split(labels, groups, batches, orders, hold_out=())
    check_no_leak(groups, a)
    # Unknown-order patients still get their share of test (not all pushed to the end of the order).
    assert 0.1 < (a[unknown] == "test").mean() < 0.3


def test_bad_fractions_and_lengths_are_refused() -> None:
    labels, groups, batches, orders = _cohort()
    with pytest.raises(ValueError, match="test \\+ val"):
        cohort_split(labels, groups, batches, orders, test_fraction=0.6, val_fraction=0.5)
    with pytest.raises(ValueError, match="same length"):
        cohort_split(labels[:-1], groups, batches, orders)
