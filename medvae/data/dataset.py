"""A torch Dataset over any store version, for downstream training on real and synthetic images."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from medvae.data.store import Store, images_from


class StoreDataset(Dataset[tuple[torch.Tensor, int]]):
    """Images of one store version as float tensors (1, H, W) in [0, 1], with integer labels.

    Label indices belong to the store version, not to the filter: by default ``label_names`` is every
    label of the version, sorted, so ``{"split": "train"}`` and ``{"split": "test"}`` (or a filter that
    leaves one class out) give each label the same index. Pass ``label_names`` to fix the order yourself,
    e.g. to a model's ``meta.json`` label names.

    Example:
        >>> ds = StoreDataset("runs/store", where={"split": "train", "origin": ["real", "synthetic"]})
        >>> x, y = ds[0]; ds.label_names[y]

    Args:
        uri: the store's URI.
        version: the version to read, latest when None.
        where: filters, e.g. ``{"origin": "synthetic"}``; a list keeps rows equal to any of its values.
        transform: applied to each image tensor.
        storage_options: for object-store URIs.
        label_names: the labels in index order; every label of the selected rows must be among them.

    Raises:
        ValueError: when a selected row's label is not in ``label_names``.
    """

    def __init__(
        self,
        uri: str,
        version: int | None = None,
        where: Mapping[str, str | list[str]] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        storage_options: dict[str, str] | None = None,
        label_names: Sequence[str] | None = None,
    ) -> None:
        store = Store(uri, storage_options)
        # Pinned once: the rows and the label list must come from the same version.
        self.version = store.table(version).version()
        table = store.read(self.version, where=where)
        # One read and one uint8 array: 4 KiB per image keeps even large versions in memory cheaply.
        self.images = images_from(table)
        labels = table.column("label").to_pylist()
        self.ids: list[str] = table.column("id").to_pylist()
        self.origins: list[str] = table.column("origin").to_pylist()
        self.splits: list[str | None] = table.column("split").to_pylist()
        if label_names is None:
            every = store.read(self.version, columns=["label"]).column("label").unique().to_pylist()
            label_names = sorted(lbl for lbl in every if lbl is not None)
        self.label_names: list[str] = list(label_names)
        self.targets = _targets(labels, self.label_names)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(self.images[i]).float().div_(255.0).unsqueeze(0)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.targets[i])


def _targets(labels: Sequence[str | None], label_names: Sequence[str]) -> np.ndarray:
    """Label indices; -1 marks an unlabelled row, so labelled and unlabelled rows can share one dataset."""
    index = {name: i for i, name in enumerate(label_names)}
    if len(index) != len(label_names):
        raise ValueError(f"label_names has repeated names: {sorted(label_names)}")
    unknown = sorted({lbl for lbl in labels if lbl is not None and lbl not in index})
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ValueError(f"{len(unknown)} label(s) of the selected rows are not in label_names: {shown}")
    return np.array([-1 if lbl is None else index[lbl] for lbl in labels], dtype=np.int64)
