"""A fixed small CNN classifier and its fixed training recipe, the yardstick for synthetic-data utility.

The architecture and the recipe are set once, up front, and are never tuned to make synthetic data look
good: the same network, optimiser, epochs, augmentation and model-selection rule are used for real-only,
real + synthetic and synthetic-only training, so differences in test AUROC come from the data alone.

Recipe (:data:`RECIPE`):

* **Network** (:class:`SmallCNN`): three blocks of 3×3 Conv → BatchNorm → ReLU → 2×2 max-pool with 16,
  32 and 64 channels (64 → 8 px), global average pooling, dropout 0.2 and one linear layer.
* **Optimisation**: Adam, learning rate 1e-3, no weight decay, batch 64, cross-entropy, a fixed number of
  epochs (12 by default), no learning-rate schedule, no class weights.
* **Augmentation**: a random translation of up to ±4 px (zero fill), nothing else. No flips: a chest
  radiograph has a left and a right.
* **Model selection**: the epoch with the highest validation AUROC (macro one-vs-rest for more than two
  classes; lowest validation loss where the validation set has one class only). Ties keep the earlier epoch.
* **Data**: the whole training set lives on the device as uint8 and is converted batch by batch, like the
  VAE trainer (channels-last layout too), so no DataLoader workers and no host-device copies per step.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

RECIPE: dict[str, Any] = {
    "architecture": "3x[Conv3x3-BN-ReLU-MaxPool2] (16,32,64) + GAP + Dropout(0.2) + Linear",
    "optimizer": "Adam",
    "lr": 1e-3,
    "weight_decay": 0.0,
    "batch_size": 64,
    "epochs": 12,
    "augmentation": "random translation up to 4 px",
    "selection": "best validation AUROC",
}

_BATCH = 64
_SHIFT = 4


def _block(i: int, o: int, k: int, stride: int) -> list[nn.Module]:
    # bias=False: BatchNorm's mean subtraction cancels a conv bias.
    return [nn.Conv2d(i, o, k, stride, k // 2, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Three Conv-BN-ReLU-MaxPool blocks (16, 32, 64 channels), global average pooling and a linear head.

    Args:
        num_classes: the number of output logits (2 for a binary task).
        channels: the widths of the three blocks; fixed by the recipe, exposed only for tiny tests.
    """

    def __init__(self, num_classes: int = 2, channels: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError("a classifier needs at least 2 classes")
        c1, c2, c3 = channels
        # A stride-2 5×5 stem: pneumonia and most findings at 64×64 are coarse, and the first block at full
        # resolution would cost three quarters of the compute (this keeps a CPU evaluation in budget).
        layers: list[nn.Module] = [
            *_block(1, c1, 5, 2),
            nn.MaxPool2d(2),  # 16×16
            *_block(c1, c2, 3, 1),
            nn.MaxPool2d(2),  # 8×8
            *_block(c2, c3, 3, 1),
        ]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(channels[-1], num_classes))
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for images (N, 1, H, W) in [0, 1]."""
        return self.head(self.features(x))


def _as_uint8_tensor(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if t.dtype != torch.uint8:
        raise ValueError(f"classifier images must be uint8 (N, H, W), got {t.dtype}")
    if t.ndim != 3:
        raise ValueError(f"classifier images must be shaped (N, H, W), got {tuple(t.shape)}")
    return t.to(device).unsqueeze(1)


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # One random translation per image: pad, then crop at a random offset (zero fill, like the padding
    # that ingest adds around a non-square scan). Offsets come from a CPU generator for reproducibility.
    n, _, h, w = x.shape
    off = torch.randint(0, 2 * _SHIFT + 1, (n, 2), generator=gen).to(x.device)
    padded = F.pad(x, (_SHIFT, _SHIFT, _SHIFT, _SHIFT))
    rows = (off[:, 0, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]
    cols = (off[:, 1, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]
    idx_n = torch.arange(n, device=x.device)[:, None, None, None]
    return padded[idx_n, torch.zeros_like(idx_n), rows, cols]


@torch.no_grad()
def predict_proba(
    model: nn.Module, images: np.ndarray | torch.Tensor, *, batch_size: int = 512, device: str | None = None
) -> np.ndarray:
    """Class probabilities for uint8 images, in eval mode (BatchNorm running statistics, no dropout).

    Args:
        model: a trained :class:`SmallCNN`.
        images: uint8 (N, H, W).
        batch_size: images per forward pass.
        device: where to compute; None: the model's device.

    Returns:
        Float64 array (N, num_classes); rows sum to 1.
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    x = _as_uint8_tensor(images, dev)
    was_training = model.training
    model.eval()
    out: list[np.ndarray] = [np.zeros((0, int(getattr(model, "num_classes", 2))))]
    try:
        for s in range(0, len(x), batch_size):
            xb = x[s : s + batch_size].float().div_(255.0).contiguous(memory_format=torch.channels_last)
            logits = model(xb)
            out.append(torch.softmax(logits.float(), dim=1).double().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out, axis=0)


def _val_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Validation AUROC (binary, or macro one-vs-rest); minus the cross-entropy when only one class."""
    present = np.unique(labels)
    if len(present) < 2:
        p = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
        return float(np.mean(np.log(p)))
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    return float(
        roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=np.arange(probs.shape[1]))
    )


def train_classifier(
    train_images: np.ndarray | torch.Tensor,
    train_labels: np.ndarray,
    val_images: np.ndarray | torch.Tensor,
    val_labels: np.ndarray,
    *,
    seed: int,
    epochs: int = 12,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
    channels: tuple[int, int, int] = (16, 32, 64),
) -> SmallCNN:
    """Train :class:`SmallCNN` with the fixed recipe and return the best-on-validation model, in eval mode.

    Args:
        train_images: uint8 (N, H, W).
        train_labels: int class indices (N,).
        val_images: uint8 (M, H, W), for model selection only.
        val_labels: int class indices (M,).
        seed: seeds the initialisation, the batch order, dropout and the augmentation.
        epochs: the fixed number of epochs (the recipe's 12 unless a test needs fewer).
        device: where the data and the model live.
        num_classes: the number of classes; default: ``max(label) + 1`` over both sets, at least 2.
        channels: the block widths; keep the default outside tests.

    Returns:
        The model from the epoch with the best validation score, on ``device``, in eval mode.

    Raises:
        ValueError: for empty or mismatched inputs.
    """
    dev = torch.device(device)
    ytr = np.asarray(train_labels, dtype=np.int64).reshape(-1)
    yva = np.asarray(val_labels, dtype=np.int64).reshape(-1)
    if len(ytr) != len(train_images) or len(yva) != len(val_images):
        raise ValueError("images and labels differ in length")
    if len(ytr) < 2 or len(yva) < 1:
        raise ValueError("train_classifier needs at least 2 training and 1 validation image")
    k = num_classes or max(2, int(max(ytr.max(), yva.max())) + 1)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    # channels_last: oneDNN (CPU) and cuDNN run conv + BatchNorm without layout reorders; measured ~3x
    # faster per image for this network on the 2-core dev box, as for the VAE trainer.
    model = SmallCNN(k, channels).to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    x = _as_uint8_tensor(train_images, dev)
    y = torch.from_numpy(ytr).to(dev)
    best_score, best_state = -float("inf"), copy.deepcopy(model.state_dict())
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen).to(dev)
        for s in range(0, len(x), _BATCH):
            idx = perm[s : s + _BATCH]
            if len(idx) < 2:
                continue  # BatchNorm cannot normalise a batch of one
            xb = _shift(x[idx].float().div_(255.0), gen).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        score = _val_score(predict_proba(model, val_images), yva)
        if score > best_score:
            best_score, best_state = score, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.eval()
