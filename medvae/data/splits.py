"""Patient-grouped splits: no patient's images ever straddle train, val and test.

Every split in medvae is made here: the evaluation's label-stratified train/val/test split and its
patient-grouped label subsamples, and the trainer's fallback validation hold-out for tiny stores. (The
store's own ``split`` column is assigned at ingest by a keyed hash, see :func:`medvae.data.deid.split_for`.)
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "val", "test")


def merge_duplicate_groups(images: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Join the groups of pixel-identical images, so that no exact duplicate can straddle two splits.

    Public datasets hold the same radiograph under two names (Kermany: 26 pixel-identical pairs at
    64×64). Treating their patients as one group keeps a test image from having its copy in training.

    Args:
        images: uint8 (N, H, W).
        groups: (N,) group names.

    Returns:
        (N,) group names; every member of a merged group gets the smallest name of the set.
    """
    parent: dict[str, str] = {g: g for g in groups.tolist()}

    def find(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    first: dict[bytes, str] = {}
    for img, g in zip(images, groups.tolist(), strict=True):
        key = hashlib.sha256(np.ascontiguousarray(img).tobytes()).digest()
        other = first.setdefault(key, g)
        a, b = find(g), find(other)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return np.array([find(g) for g in groups.tolist()], dtype=str)


def _group_hash(salt: str, seed: int, group: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}\0{seed}\0{group}".encode()).digest()[:8], "big")


def _strata(groups: np.ndarray, labels: np.ndarray) -> dict[str, str]:
    # A patient's stratum is its most frequent label (ties: the smallest name), so patients with both
    # normal and abnormal images (possible in NIH) still belong to exactly one stratum.
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for g, lbl in zip(groups.tolist(), labels.tolist(), strict=True):
        counts[g][lbl] += 1
    return {g: min(c, key=lambda k: (-c[k], k)) for g, c in counts.items()}


def patient_split(
    groups: np.ndarray,
    labels: np.ndarray,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    seed: int = 0,
) -> np.ndarray:
    """A deterministic, label-stratified, patient-grouped train/val/test split.

    Within each stratum (the patients whose majority label is the same), patients are ordered by
    ``sha256(salt, seed, patient)`` and laid end to end by image count; a patient goes to the split in
    whose share of the stratum's images its midpoint falls. Every image of a patient therefore lands in
    one split, the image shares follow ``fractions`` in every class, and the result depends on the seed
    and the patient names only (not on the order of the rows or on any store key).

    Args:
        groups: (N,) patient names.
        labels: (N,) label names.
        fractions: train/val/test shares.
        seed: the split seed.

    Returns:
        (N,) array of ``"train"``, ``"val"`` or ``"test"``.
    """
    groups = np.asarray(groups, dtype=str)
    labels = np.asarray(labels, dtype=str)
    strata = _strata(groups, labels)
    size: dict[str, int] = defaultdict(int)
    for g in groups.tolist():
        size[g] += 1
    cuts = np.cumsum(fractions)[:-1]
    assign: dict[str, str] = {}
    for stratum in sorted(set(strata.values())):
        members = sorted(
            (g for g, s in strata.items() if s == stratum), key=lambda g: (_group_hash("split", seed, g), g)
        )
        total = sum(size[g] for g in members)
        done = 0
        for g in members:
            mid = (done + size[g] / 2.0) / total
            done += size[g]
            assign[g] = SPLITS[int(np.searchsorted(cuts, mid, side="right"))]
    return np.array([assign[g] for g in groups.tolist()], dtype=str)


def grouped_subsample(groups: np.ndarray, labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """A label-stratified, patient-grouped subsample of about ``fraction`` of the images.

    Patients are taken in ``sha256(salt, seed, patient)`` order within each stratum until the stratum's
    share is reached; every stratum keeps at least one patient.

    Args:
        groups: (N,) patient names.
        labels: (N,) label names.
        fraction: in (0, 1]; 1 keeps everything.
        seed: the subsample seed.

    Returns:
        Boolean mask (N,).
    """
    groups = np.asarray(groups, dtype=str)
    if fraction >= 1.0:
        return np.ones(len(groups), dtype=bool)
    strata = _strata(groups, np.asarray(labels, dtype=str))
    size: dict[str, int] = defaultdict(int)
    for g in groups.tolist():
        size[g] += 1
    chosen: set[str] = set()
    for stratum in sorted(set(strata.values())):
        members = sorted(
            (g for g, s in strata.items() if s == stratum),
            key=lambda g: (_group_hash("subsample", seed, g), g),
        )
        target = fraction * sum(size[g] for g in members)
        taken = 0
        for g in members:
            if taken >= target and taken > 0:
                break
            chosen.add(g)
            taken += size[g]
    return np.array([g in chosen for g in groups.tolist()], dtype=bool)


def check_no_leak(groups: np.ndarray, split: np.ndarray) -> None:
    """Raise AssertionError if any patient has images in two different splits."""
    seen: dict[str, str] = {}
    for g, s in zip(np.asarray(groups).tolist(), np.asarray(split).tolist(), strict=True):
        if seen.setdefault(g, s) != s:
            raise AssertionError(f"patient {g!r} appears in both the {seen[g]} and the {s} split")


def grouped_holdout(groups: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a patient-grouped hold-out of about ``fraction`` of the rows."""
    uniq = sorted(set(groups))
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    n_hold = max(1, round(len(uniq) * fraction))
    held = set(uniq[:n_hold])
    return np.array([g in held for g in groups], dtype=bool)


def cohort_split(
    labels: np.ndarray,
    groups: np.ndarray,
    batches: np.ndarray,
    orders: np.ndarray,
    *,
    hold_out: Sequence[str] | None = None,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> np.ndarray:
    """A shift-aware split: whole acquisition batches, and the earliest acquisitions, are the test set.

    A random patient split tests on the training cohort, so it overestimates how a model does on a new
    one. Here, within each stratum (a patient's majority label and its batch):

    * a batch in ``hold_out`` goes wholly to test (a separately acquired cohort the model never sees);
    * otherwise patients are laid end to end in acquisition order (``orders``), and those whose midpoint
      falls in the first ``test_fraction`` of the stratum's images are test (an earlier period, as in
      Kermany's official test split); patients without an order (-1) are placed by hash instead;
    * of the remaining patients, a hashed ``val_fraction`` of the stratum's images is val: the in-cohort
      normals a threshold is calibrated on, as a deployment would have.

    Args:
        labels: (N,) label names.
        groups: (N,) patients (every image of one patient lands in one split).
        batches: (N,) acquisition batch names ("" for the default batch).
        orders: (N,) acquisition order numbers (e.g. patient numbers given out in time), -1 when unknown.
        hold_out: the batches that go wholly to test; None: every named (non-empty) batch.
        test_fraction: share of each remaining stratum's images that is test.
        val_fraction: share of each remaining stratum's images that is val.
        seed: seed of the val hash (the test set does not depend on it).

    Returns:
        (N,) array of ``"train"``, ``"val"`` or ``"test"``.

    Raises:
        ValueError: for fractions outside (0, 1) or summing to 1 or more, or arrays of unequal length.
    """
    if not (0 < test_fraction < 1 and 0 < val_fraction < 1 and test_fraction + val_fraction < 1):
        raise ValueError(f"need 0 < test, val and test + val < 1, got {test_fraction}, {val_fraction}")
    groups, batches = np.asarray(groups, dtype=str), np.asarray(batches, dtype=str)
    orders = np.asarray(orders, dtype=np.int64)
    if not len(groups) == len(labels) == len(batches) == len(orders):
        raise ValueError("labels, groups, batches and orders must have the same length")
    held = {b for b in batches.tolist() if b} if hold_out is None else set(hold_out)
    # Stratum: label, batch, and whether the acquisition order is known (unknown ones go by hash).
    known = np.where(orders >= 0, "k", "u")
    keys = [
        f"{lbl}\0{b}\0{k}"
        for lbl, b, k in zip(
            np.asarray(labels, dtype=str).tolist(), batches.tolist(), known.tolist(), strict=True
        )
    ]
    strata = _strata(groups, np.array(keys, dtype=str))
    size: dict[str, int] = defaultdict(int)
    first: dict[str, int] = {}
    for g, o in zip(groups.tolist(), orders.tolist(), strict=True):
        size[g] += 1
        if o >= 0:  # a patient's earliest known acquisition orders it
            first[g] = min(first.get(g, o), o)
    assign: dict[str, str] = {}
    for stratum in sorted(set(strata.values())):
        members = [g for g, s in strata.items() if s == stratum]
        _, batch, order_known = stratum.split("\0")
        if batch in held:
            assign.update({g: "test" for g in members})
            continue
        by_order = order_known == "k"
        members.sort(key=lambda g: (first.get(g, 0) if by_order else 0, _group_hash("cohort", seed, g), g))
        total = sum(size[g] for g in members)
        done, rest = 0, []
        for g in members:
            mid = (done + size[g] / 2.0) / total
            done += size[g]
            if mid < test_fraction:
                assign[g] = "test"
            else:
                rest.append(g)
        rest.sort(key=lambda g: (_group_hash("cohort-val", seed, g), g))
        done = 0
        for g in rest:
            mid = (done + size[g] / 2.0) / total
            done += size[g]
            assign[g] = "val" if mid < val_fraction else "train"
    return np.array([assign[g] for g in groups.tolist()], dtype=str)
