"""The training engine: one loop for one process and for torchrun's many (docs/distributed_training.md).

Modules: ``trainer`` (:func:`train_vae`), ``loop`` (the epoch and evaluation loops, callbacks' hooks),
``callbacks`` (model selection, checkpoints, progress), ``strategy`` (:class:`Local`, :class:`Torchrun`,
:func:`session`), ``checkpoint``, ``device`` and ``data``. Importing it needs torch, pydantic, PyYAML
and rich only (no MONAI, pydicom, Prefect or deltalake).
"""

from medvae.engine.checkpoint import CHECKPOINT_NAME, load_checkpoint
from medvae.engine.device import select_device
from medvae.engine.loop import Callback
from medvae.engine.strategy import Local, Strategy, Torchrun, on_main, session
from medvae.engine.trainer import TrainResult, train_vae

__all__ = [
    "CHECKPOINT_NAME",
    "Callback",
    "Local",
    "Strategy",
    "Torchrun",
    "TrainResult",
    "load_checkpoint",
    "on_main",
    "select_device",
    "session",
    "train_vae",
]
