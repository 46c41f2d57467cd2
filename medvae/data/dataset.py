"""A torch Dataset over any store version, for downstream training on real and synthetic images."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from medvae.data.store import Store, images_from


class StoreDataset(Dataset[tuple[torch.Tensor, int]]):
    """Images of one store version as float tensors (1, H, W) in [0, 1], with integer labels.

    Example:
        >>> ds = StoreDataset("runs/store", version=1, where={"split": "train"})
        >>> x, y = ds[0]; ds.label_names[y]

    Args:
        uri: the store's URI.
        version: the version to read, latest when None.
        where: equality filters, e.g. ``{"origin": "synthetic"}``.
        transform: applied to each image tensor.
        storage_options: for object-store URIs.
    """

    def __init__(
        self,
        uri: str,
        version: int | None = None,
        where: dict[str, str] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        storage_options: dict[str, str] | None = None,
    ) -> None:
        store = Store(uri, storage_options)
        table = store.read(version, where=where)
        # One read and one uint8 array: 4 KiB per image keeps even large versions in memory cheaply.
        self.images = images_from(table)
        labels = table.column("label").to_pylist()
        self.ids: list[str] = table.column("id").to_pylist()
        self.origins: list[str] = table.column("origin").to_pylist()
        self.splits: list[str | None] = table.column("split").to_pylist()
        self.label_names: list[str] = sorted({lbl for lbl in labels if lbl is not None})
        index = {name: i for i, name in enumerate(self.label_names)}
        # -1 marks an unlabelled row, so labelled and unlabelled rows can share one dataset.
        self.targets = np.array(
            [index.get(lbl, -1) if lbl is not None else -1 for lbl in labels], dtype=np.int64
        )
        self.version = store.table(version).version()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(self.images[i]).float().div_(255.0).unsqueeze(0)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.targets[i])
