"""What happens after each epoch: model selection with early stopping, checkpoints, a progress bar."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from medvae.engine.checkpoint import make_checkpoint, save_checkpoint
from medvae.engine.loop import Callback, Run, clone_state

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


class ModelSelection(Callback):
    """Keep the best-validation weights and stop after ``patience`` epochs without improvement.

    During the KL warm-up the model is still being pulled towards the prior, and its validation ELBO
    can look best at epoch 0 or 1, before the KL term bites; selecting or stopping on those epochs
    kept an untrained model (measured: the tutorial recipe at batch 128 stopped at epoch 10 with
    epoch 1's weights, SSIM 0.12). So warm-up epochs never count against patience, and the model at
    the end of the warm-up is where selection starts. The decisions use the global (all-reduced)
    validation loss, so every rank takes the same ones.

    Args:
        patience: epochs without a strictly lower validation loss before stopping.
        warmup_epochs: ``cfg.loss.kl_warmup_epochs``.
        epochs: ``cfg.epochs`` (stopping at the last epoch is not early).
        min_epochs: no early stop before this many epochs (``TrainConfig.min_steps`` in epochs).
    """

    def __init__(self, patience: int, warmup_epochs: int, epochs: int, min_epochs: int = 0) -> None:
        self.patience, self.warmup_epochs, self.epochs = patience, warmup_epochs, epochs
        self.min_epochs = min_epochs

    def on_epoch_end(self, run: Run, record: dict[str, Any]) -> None:
        """Select this epoch's weights if they are the best so far, else count a bad epoch."""
        s, epoch, val = run.state, int(record["epoch"]), float(record["val_loss"])
        if epoch < self.warmup_epochs or val < s.best_val:  # NaN never compares lower: no improvement
            s.best_val, s.best_epoch, s.bad_epochs = val, epoch, 0
            s.best_state = clone_state(run.engine.model)
        else:
            s.bad_epochs += 1
            waited = s.bad_epochs >= self.patience and epoch + 1 >= self.min_epochs
            s.stopped_early = waited and epoch + 1 < self.epochs


class Checkpointer(Callback):
    """Write ``path`` atomically after every epoch, on rank 0 only; the other ranks wait and fail with it.

    Put it after :class:`ModelSelection`, whose state the checkpoint records.

    Args:
        path: the checkpoint file (its folder is created).
        n_train: training images (a resume checks them).
        n_val: validation images.
    """

    def __init__(self, path: Path, n_train: int, n_val: int) -> None:
        self.path, self.n_train, self.n_val = path, n_train, n_val

    def on_fit_start(self, run: Run) -> None:
        """Create the checkpoint folder (rank 0)."""
        run.strategy.on_main(lambda: self.path.parent.mkdir(parents=True, exist_ok=True))

    def on_epoch_end(self, run: Run, record: dict[str, Any]) -> None:
        """Save the run's weights, optimizer and selection state (rank 0; the others wait)."""
        run.strategy.on_main(lambda: self._save(run))

    def _save(self, run: Run) -> None:
        ckpt = make_checkpoint(
            run.engine.model,
            run.engine.optimizer,
            run.state.to_checkpoint(),
            run.cfg,
            n_train=self.n_train,
            n_val=self.n_val,
            world_size=run.strategy.world_size,
        )
        save_checkpoint(ckpt, self.path)


def _fmt(v: float) -> str:
    return f"{v:.4g}"


class ProgressBar(Callback):
    """A rich progress bar over epochs with the last epoch's losses and throughput, on rank 0 only.

    Args:
        enabled: False hides it (rank 0's only; the other ranks never show one).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def on_fit_start(self, run: Run) -> None:
        """Open the bar at the epochs already done (a resume)."""
        if not (self.enabled and run.strategy.is_main):
            return
        # Imported here: the engine itself needs torch, pydantic and PyYAML only (benchmarks/gpu_train.py).
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (
            TextColumn("[bold]train[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[metrics]}"),
        )
        self._bar = Progress(*columns, transient=False)
        self._bar.start()
        done = min(run.state.epoch + 1, run.cfg.epochs)
        self._task = self._bar.add_task("train", total=run.cfg.epochs, completed=done, metrics="")

    def on_epoch_end(self, run: Run, record: dict[str, Any]) -> None:
        """Advance by one epoch and show its figures."""
        if self._bar is None or self._task is None:
            return
        r = record
        metrics = (
            f"loss {_fmt(r['loss'])}  recon {_fmt(r['recon'])}  KL {_fmt(r['kl'])}  "
            f"val {_fmt(r['val_loss'])}  ({r['img_per_s']:.0f} img/s)"
        )
        self._bar.update(self._task, advance=1, metrics=metrics)

    def on_fit_end(self, run: Run) -> None:
        """Close the bar (also after an error)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
