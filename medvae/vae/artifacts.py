"""Self-describing model directories: safetensors weights, resolved config, metrics, calibration, versions and a content hash."""  # noqa: E501

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

import medvae
from medvae.config import TrainConfig
from medvae.vae.model import ConvVAE

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
META = "meta.json"
METRICS = "metrics.json"
VERSIONS = "versions.json"
HASH = "hash.txt"
FORMAT = "medvae-model"
FORMAT_VERSION = 1
# Files computed from a model's weights by later stages; a new model in the same directory makes them
# stale, so save_model_dir removes them rather than leave an old calibration beside new weights.
_DERIVED = ("calibration.json", "calibration.safetensors")
# Reported in versions.json when installed, read from package metadata: importing them would be slow and
# they need not be importable on a training-only GPU box.
_OPTIONAL_PACKAGES = ("torchvision", "monai", "pydicom", "deltalake", "prefect", "safetensors", "pydantic")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Ends with what to do: CLI users see this text as their one-line error.
_LAYOUT = (
    f"a medvae model directory holds {WEIGHTS}, {CONFIG}, {META} and {HASH}; "
    "make one with `medvae train --store STORE --out DIR`"
)


def package_versions() -> dict[str, str]:
    """Versions of Python, the platform and the packages a model depends on.

    Optional packages are looked up in the installed distributions' metadata, never imported, and are
    left out when absent.

    Returns:
        A flat name → version mapping (always with ``python``, ``platform``, ``torch``, ``numpy`` and
        ``medvae``).
    """
    out = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "medvae": medvae.__version__,
    }
    if torch.version.cuda:
        out["torch_cuda"] = str(torch.version.cuda)
    for name in _OPTIONAL_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def _check_name(name: str, suffix: str) -> None:
    # Only plain file names inside the directory: no paths, no hidden or temporary files, and never
    # hash.txt, which only finalize() writes.
    if not _NAME.match(name) or name == HASH or not name.endswith(suffix):
        raise ValueError(f"{name!r} is not a valid model-directory file name ending in {suffix!r}")


def _atomic_write(path: Path, data: bytes) -> None:
    # Temporary file in the same directory, fsync, rename: readers see the old or the new file, whole.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _tensor_bytes(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    # safetensors stores plain contiguous CPU buffers: a channels-last or GPU tensor is copied first.
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return st_save(flat, metadata=metadata)


def _require_dir(model_dir: Path) -> None:
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"{model_dir} is not a directory; {_LAYOUT}")


def _require_model_dir(model_dir: Path) -> Path:
    model_dir = Path(model_dir)
    _require_dir(model_dir)
    if not (model_dir / WEIGHTS).is_file():
        pickles = sorted(
            p.name
            for p in model_dir.iterdir()
            if p.suffix in {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin"}
        )
        hint = (
            f"; found {pickles}, but pickled weights are never loaded (unpickling can run arbitrary code)"
            if pickles
            else ""
        )
        raise FileNotFoundError(f"{model_dir} has no {WEIGHTS}: {_LAYOUT}{hint}")
    return model_dir


def _file_digests(model_dir: Path) -> list[tuple[str, str]]:
    # Top-level regular files only: subdirectories (e.g. a training checkpoint/) are not part of the
    # model, and dot-files are in-flight temporaries.
    out = []
    for p in sorted(model_dir.iterdir(), key=lambda q: q.name):
        if p.name == HASH or p.name.startswith(".") or not p.is_file() or p.is_symlink():
            continue
        h = hashlib.sha256()
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out.append((p.name, h.hexdigest()))
    return out


def _combine(digests: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, hexdigest in digests:
        # NUL and newline cannot occur in the names we allow, so the encoding is unambiguous.
        h.update(name.encode("utf-8") + b"\0" + hexdigest.encode("ascii") + b"\n")
    return h.hexdigest()


def finalize(model_dir: Path) -> str:
    """Compute the directory's content hash and write it to ``hash.txt``.

    The hash is the sha256 over the sorted ``(name, sha256(bytes))`` pairs of every other top-level
    file; ``hash.txt`` holds it on its first line, followed by the per-file digests (``sha256sum``
    format) so that a mismatch can be traced to a file.

    Args:
        model_dir: the model directory.

    Returns:
        The hex digest.
    """
    model_dir = Path(model_dir)
    digests = _file_digests(model_dir)
    digest = _combine(digests)
    body = digest + "\n" + "".join(f"{h}  {name}\n" for name, h in digests)
    _atomic_write(model_dir / HASH, body.encode("ascii"))
    return digest


def model_hash(model_dir: Path, verify: bool = False) -> str:
    """The content hash recorded in ``hash.txt``.

    Args:
        model_dir: the model directory.
        verify: recompute the hash from the files and compare.

    Returns:
        The hex digest.

    Raises:
        FileNotFoundError: when there is no ``hash.txt``.
        ValueError: with ``verify``, when the files no longer match the recorded hash.
    """
    model_dir = Path(model_dir)
    path = model_dir / HASH
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no {HASH}; {_LAYOUT}")
    lines = path.read_text(encoding="ascii").splitlines()
    recorded = lines[0].strip() if lines else ""
    if verify:
        digests = _file_digests(model_dir)
        actual = _combine(digests)
        if actual != recorded:
            listed = dict(
                (parts[1], parts[0]) for parts in (ln.split("  ", 1) for ln in lines[1:]) if len(parts) == 2
            )
            now = dict(digests)
            changed = sorted(n for n in set(listed) | set(now) if listed.get(n) != now.get(n))
            raise ValueError(
                f"{model_dir} does not match its {HASH} (recorded {recorded[:12]}, files hash to "
                f"{actual[:12]}); changed, added or removed: {changed or 'unknown'}. "
                "It was modified after it was written; refusing it."
            )
    return recorded


def write_json(model_dir: Path, name: str, obj: dict[str, Any]) -> None:
    """Write ``name`` (a ``.json`` file) into a model directory atomically and refresh its hash.

    Args:
        model_dir: an existing model directory.
        name: a plain file name ending in ``.json``.
        obj: JSON-serialisable data.
    """
    model_dir = _require_model_dir(model_dir)
    _check_name(name, ".json")
    _atomic_write(model_dir / name, _json_bytes(obj))
    finalize(model_dir)


def write_tensors(model_dir: Path, name: str, tensors: dict[str, Tensor]) -> None:
    """Write ``name`` (a ``.safetensors`` file) into a model directory atomically and refresh its hash.

    Args:
        model_dir: an existing model directory.
        name: a plain file name ending in ``.safetensors``.
        tensors: name → tensor (moved to CPU and made contiguous for storage).
    """
    model_dir = _require_model_dir(model_dir)
    _check_name(name, ".safetensors")
    _atomic_write(model_dir / name, _tensor_bytes(tensors))
    finalize(model_dir)


def read_json(model_dir: Path, name: str) -> dict[str, Any]:
    """Read a JSON file of a model directory.

    Args:
        model_dir: the model directory.
        name: the file name.

    Returns:
        The parsed object (a dict).

    Raises:
        FileNotFoundError: when the file is missing.
        ValueError: when it does not hold a JSON object.
    """
    _check_name(name, ".json")
    _require_dir(model_dir)  # "DIR is not a directory" says more than "DIR/meta.json not found"
    path = Path(model_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {_LAYOUT}")
    obj = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def read_tensors(model_dir: Path, name: str) -> dict[str, Tensor]:
    """Read a safetensors file of a model directory (safe: no code is ever deserialised).

    Args:
        model_dir: the model directory.
        name: the file name.

    Returns:
        name → CPU tensor.

    Raises:
        FileNotFoundError: when the file is missing.
        ValueError: when it is not a valid safetensors file.
    """
    _check_name(name, ".safetensors")
    path = Path(model_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {_LAYOUT}")
    try:
        return st_load(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path} is not a valid safetensors file ({exc}); {_LAYOUT}") from exc


def save_model_dir(
    out: Path,
    model: nn.Module,
    cfg: TrainConfig,
    *,
    label_names: list[str],
    dataset: dict[str, Any],
    metrics: dict[str, Any],
) -> None:
    """Write a complete model directory, then its hash.

    Every file is written atomically. Calibration files of a previous model in ``out`` are removed,
    since they would not describe the new weights; other files are left alone (and hashed).

    Args:
        out: the directory (created if missing).
        model: the trained VAE (any device, any memory format; never its ``torch.compile`` wrapper).
        cfg: the resolved training configuration (with ``model.num_classes`` set for a CVAE).
        label_names: class names in label-index order.
        dataset: where the training data came from (store URI, version, row filter, row counts).
        metrics: training history and summary (JSON-serialisable).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in _DERIVED:
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    state = model.state_dict()
    if any(k.startswith("_orig_mod.") for k in state):
        raise ValueError("pass the underlying ConvVAE, not its torch.compile wrapper")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "label_names": list(label_names),
        "dataset": dataset,
        "created_by": f"medvae {medvae.__version__}",
    }
    _atomic_write(
        out / WEIGHTS, _tensor_bytes(state, metadata={"format": "pt", "medvae": medvae.__version__})
    )
    _atomic_write(out / CONFIG, _json_bytes(cfg.model_dump(mode="json")))
    _atomic_write(out / META, _json_bytes(meta))
    _atomic_write(out / METRICS, _json_bytes(metrics))
    _atomic_write(out / VERSIONS, _json_bytes(package_versions()))
    finalize(out)


@dataclass
class LoadedModel:
    """A model directory loaded for inference.

    Attributes:
        model: the VAE in eval mode on the requested device.
        cfg: the training configuration it was trained with.
        label_names: class names in label-index order.
        meta: the contents of ``meta.json``.
        hash: the directory's content hash (verified when loaded with ``verify=True``).
        model_dir: where it was loaded from.
    """

    model: ConvVAE
    cfg: TrainConfig
    label_names: list[str]
    meta: dict[str, Any]
    hash: str
    model_dir: Path


def load_model(model_dir: Path, device: str | torch.device = "cpu", verify: bool = True) -> LoadedModel:
    """Load a model directory written by :func:`save_model_dir`.

    Only safetensors weights and JSON are read; pickle files (``.pt`` and the like) are never loaded,
    because unpickling can execute arbitrary code.

    Args:
        model_dir: the model directory.
        device: where to put the model.
        verify: recompute the content hash and refuse a directory modified after it was written.

    Returns:
        The model (eval mode) with its configuration, label names, metadata and hash.

    Raises:
        FileNotFoundError: when the directory or one of its required files is missing.
        ValueError: when a file is malformed, the hash does not match, or the weights do not fit the
            configured architecture.
    """
    model_dir = _require_model_dir(Path(model_dir))
    for name in (CONFIG, META):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir} has no {name}: {_LAYOUT}")
    digest = model_hash(model_dir, verify=True) if verify else _load_hash_or_compute(model_dir)
    meta = read_json(model_dir, META)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{model_dir / META} does not describe a {FORMAT} directory: {_LAYOUT}")
    cfg = TrainConfig.model_validate(read_json(model_dir, CONFIG))
    state = read_tensors(model_dir, WEIGHTS)
    model = ConvVAE(cfg.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{model_dir / WEIGHTS} does not fit the architecture in {CONFIG}: {exc}") from exc
    model.to(torch.device(device)).eval()
    labels = meta.get("label_names", [])
    if not isinstance(labels, list) or not all(isinstance(s, str) for s in labels):
        raise ValueError(f"{model_dir / META}: label_names must be a list of strings")
    return LoadedModel(model, cfg, list(labels), meta, digest, model_dir)


def _load_hash_or_compute(model_dir: Path) -> str:
    try:
        return model_hash(model_dir)
    except FileNotFoundError:
        return _combine(_file_digests(model_dir))


__all__ = [
    "CONFIG",
    "HASH",
    "META",
    "METRICS",
    "VERSIONS",
    "WEIGHTS",
    "LoadedModel",
    "finalize",
    "load_model",
    "model_hash",
    "package_versions",
    "read_json",
    "read_tensors",
    "save_model_dir",
    "write_json",
    "write_tensors",
]
