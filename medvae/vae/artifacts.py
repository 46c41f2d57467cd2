"""Self-describing model directories: safetensors weights, resolved config, metrics, calibration, versions,
a content hash and a signature.

**Integrity: ``hash.txt``.** The content hash is the sha256 over the sorted ``(name, sha256(bytes))``
pairs of every top-level file. It proves that the files are the ones the hash was computed on: a flipped
byte, an edited threshold, an added or removed file is detected when the directory is loaded. It does
not prove *who* wrote them: anyone who can edit the directory can edit it and run :func:`finalize` (or
``sha256sum``) again, and the hash matches. The same weights and files always give the same hash (the
safetensors header is written in one fixed order), so the hash also names a model reproducibly.

**Authenticity: ``signature.txt``.** :func:`sign` writes an HMAC-SHA256 of the content hash keyed by the
secret key of the store the model was trained on (:meth:`medvae.data.store.Store.key`). Only someone who
can read that key can make a signature that verifies, so a verified signature says that the directory
was written by a process with access to the store (a medvae training run) and not changed since, e.g.
that no one swapped in weights that pass a chosen scan as normal. :func:`load_model` verifies it when
given the key (:func:`store_key` reads it when the store is reachable) and refuses a mismatch in one
line. Without the key a signature can be neither checked nor forged; a directory signed before a later
:func:`write_json` no longer verifies, so signing is the last step of writing a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib.metadata
import json
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

import medvae
from medvae._io import atomic_write_bytes, json_bytes
from medvae.config import TrainConfig
from medvae.data.deid import keyed_hash
from medvae.vae.model import ConvVAE

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
META = "meta.json"
METRICS = "metrics.json"
TIMING = "timing.json"
VERSIONS = "versions.json"
HASH = "hash.txt"
SIGNATURE = "signature.txt"
FORMAT = "medvae-model"
FORMAT_VERSION = 1
# Files computed from a model's weights by later stages; a new model in the same directory makes them
# stale, so save_model_dir removes them rather than leave an old calibration beside new weights.
_DERIVED = ("calibration.json", "calibration.safetensors")
# Reported in versions.json when installed, read from package metadata: importing them would be slow and
# they need not be importable on a training-only GPU box.
_OPTIONAL_PACKAGES = ("torchvision", "monai", "pydicom", "deltalake", "prefect", "safetensors", "pydantic")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Written after the hash and about it, so never part of it; and the wall-clock record of the run, which
# differs between two runs that give the same weights (the hash names the model, not the run).
_NOT_HASHED = frozenset({HASH, SIGNATURE, TIMING})
# Training metrics that measure the machine, not the model: split off into TIMING.
_WALL_CLOCK = frozenset({"seconds", "img_per_s"})
# keyed_hash domains: the signature of a content hash, and an id of the key that made it (for messages).
_SIGNATURE_KIND, _KEY_ID_KIND = "model-signature", "model-signature-key-id"
# What ModelConfig fields defaulted to before they existed: config.json files written then must load as
# the model they describe (they were trained with the one-hot on z only, and no encoder label planes).
_MODEL_DEFAULTS_BEFORE = {"conditioning": "concat", "encoder_label_planes": False}
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
    # hash.txt or signature.txt, which only finalize() and sign() write.
    if not _NAME.match(name) or name in _NOT_HASHED or not name.endswith(suffix):
        raise ValueError(f"{name!r} is not a valid model-directory file name ending in {suffix!r}")


def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, mode=0o644)


def _tensor_bytes(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    # safetensors stores plain contiguous CPU buffers: a channels-last or GPU tensor is copied first.
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return _canonical_header(st_save(flat, metadata=metadata))


def _canonical_header(data: bytes) -> bytes:
    """safetensors bytes with the ``__metadata__`` of the header in sorted key order.

    safetensors (0.8) keeps the metadata in a Rust HashMap, whose order changes from call to call, so
    the same weights gave a different file, and a different model hash, one save in two. The header is
    rewritten with the same entries, so its length and every offset stay the same.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__")
    if not meta:
        return data
    header["__metadata__"] = dict(sorted(meta.items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > n:  # cannot happen for safetensors' compact JSON; never write a broken file
        raise RuntimeError("safetensors header grew when sorted; refusing to write it")
    return data[:8] + text.ljust(n, b" ") + data[8 + n :]


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
        if p.name in _NOT_HASHED or p.name.startswith(".") or not p.is_file() or p.is_symlink():
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


def sign(model_dir: Path, key: bytes) -> str:
    """Sign a model directory with a store's key: write ``signature.txt``; call it after the last write.

    The hash is verified first, so only a directory that matches its ``hash.txt`` is ever signed.

    Args:
        model_dir: the model directory.
        key: the secret key of the store the model was trained on (``Store(uri).key()``).

    Returns:
        The signature (hex).
    """
    model_dir = _require_model_dir(Path(model_dir))
    digest = model_hash(model_dir, verify=True)
    signature = keyed_hash(key, _SIGNATURE_KIND, digest.encode("ascii"))
    body = f"{signature}\nkey {_key_id(key)}\nhmac-sha256 of the content hash in {HASH}\n"
    _atomic_write(model_dir / SIGNATURE, body.encode("ascii"))
    return signature


def verify_signature(model_dir: Path, key: bytes) -> bool:
    """Check ``signature.txt`` against the directory's files and a store's key.

    Args:
        model_dir: the model directory.
        key: the secret key of the store the model was trained on.

    Returns:
        True when the directory is signed and the signature verifies; False when it is not signed.

    Raises:
        ValueError: one line, when a signature is present but does not verify.
    """
    model_dir = Path(model_dir)
    path = model_dir / SIGNATURE
    if not path.is_file():
        return False
    lines = path.read_text(encoding="ascii", errors="replace").splitlines()
    recorded = lines[0].strip() if lines else ""
    # Over the files as they are now, not over hash.txt: a signature then also vouches for integrity.
    actual = _combine(_file_digests(model_dir))
    if hmac.compare_digest(recorded, keyed_hash(key, _SIGNATURE_KIND, actual.encode("ascii"))):
        return True
    signer = next((ln.split(" ", 1)[1].strip() for ln in lines[1:] if ln.startswith("key ")), None)
    why = (
        "it was signed with the key of another store"
        if signer is not None and signer != _key_id(key)
        else "its files changed after it was signed"
    )
    raise ValueError(
        f"{model_dir} does not match its {SIGNATURE} under the training store's key ({why}); "
        "refusing it: retrain, or copy the model again from where it was trained"
    )


def _key_id(key: bytes) -> str:
    # Names a key in messages without revealing anything about it.
    return keyed_hash(key, _KEY_ID_KIND, b"")[:16]


def store_key(uri: str | None, storage_options: dict[str, str] | None = None) -> bytes | None:
    """The key of the store at ``uri`` for verifying a signature, or None when it cannot be read.

    Never creates a key. A store that does not exist here or cannot be reached (a model copied to
    another machine) gives None: the caller then loads the model with its hash checked only.

    Args:
        uri: the store the model was trained on (``meta["dataset"]["store"]``).
        storage_options: for object-store URIs.
    """
    if not uri:
        return None
    from medvae.data.store import Store
    from medvae.errors import StoreError

    try:
        return Store(uri, storage_options).key(create=False)
    except (StoreError, OSError, ValueError):
        return None


def write_json(model_dir: Path, name: str, obj: dict[str, Any]) -> None:
    """Write ``name`` (a ``.json`` file) into a model directory atomically and refresh its hash.

    Args:
        model_dir: an existing model directory.
        name: a plain file name ending in ``.json``.
        obj: JSON-serialisable data.
    """
    model_dir = _require_model_dir(model_dir)
    _check_name(name, ".json")
    _atomic_write(model_dir / name, json_bytes(obj))
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


def split_wall_clock(obj: Any) -> tuple[Any, Any]:
    """``obj`` without its wall-clock fields, and those fields alone, each in the same nesting.

    Lists keep their length (an epoch without timing becomes ``{}``), so ``timing["history"][i]`` is
    epoch ``i``'s.
    """
    if isinstance(obj, dict):
        kept: dict[str, Any] = {}
        timing: dict[str, Any] = {}
        for k, v in obj.items():
            if k in _WALL_CLOCK:
                timing[k] = v
                continue
            kept[k], t = split_wall_clock(v)
            # None: a leaf; {} or a list of {}: a branch without timing. Neither is worth a key.
            if t and (not isinstance(t, list) or any(t)):
                timing[k] = t
        return kept, timing
    if isinstance(obj, list):
        pairs = [split_wall_clock(v) for v in obj]
        return [a for a, _ in pairs], [b if b is not None else {} for _, b in pairs]
    return obj, None


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
        metrics: training history and summary (JSON-serialisable). Its wall-clock fields (``seconds``,
            ``img_per_s``) go to ``timing.json``, outside the hash, so that the same training gives the
            same model hash on a busy machine and an idle one.
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
    _atomic_write(out / CONFIG, json_bytes(cfg.model_dump(mode="json")))
    _atomic_write(out / META, json_bytes(meta))
    kept, timing = split_wall_clock(metrics)
    _atomic_write(out / METRICS, json_bytes(kept))
    _atomic_write(out / TIMING, json_bytes(timing))
    _atomic_write(out / VERSIONS, json_bytes(package_versions()))
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
        signature: ``"verified"`` (signed, and the signature checks out under the key given),
            ``"unsigned"`` (a key was given but the directory has no signature) or ``"not checked"``.
    """

    model: ConvVAE
    cfg: TrainConfig
    label_names: list[str]
    meta: dict[str, Any]
    hash: str
    model_dir: Path
    signature: Literal["verified", "unsigned", "not checked"] = "not checked"


def load_model(
    model_dir: Path,
    device: str | torch.device = "cpu",
    verify: bool = True,
    *,
    key: bytes | None = None,
    require_signature: bool = False,
) -> LoadedModel:
    """Load a model directory written by :func:`save_model_dir`.

    Only safetensors weights and JSON are read; pickle files (``.pt`` and the like) are never loaded,
    because unpickling can execute arbitrary code.

    Args:
        model_dir: the model directory.
        device: where to put the model.
        verify: recompute the content hash and refuse a directory modified after it was written.
        key: the training store's key (:func:`store_key`): verify ``signature.txt`` with it.
        require_signature: with a key, refuse a directory that is not signed (by default such a
            directory, written before signing existed, loads as ``signature="unsigned"``).

    Returns:
        The model (eval mode) with its configuration, label names, metadata, hash and signature status.

    Raises:
        FileNotFoundError: when the directory or one of its required files is missing.
        ValueError: when a file is malformed, the hash or the signature does not match, or the weights
            do not fit the configured architecture.
    """
    model_dir = _require_model_dir(Path(model_dir))
    for name in (CONFIG, META):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir} has no {name}: {_LAYOUT}")
    digest = model_hash(model_dir, verify=True) if verify else _load_hash_or_compute(model_dir)
    signature = _check_signature(model_dir, key, require_signature)
    meta = read_json(model_dir, META)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{model_dir / META} does not describe a {FORMAT} directory: {_LAYOUT}")
    cfg = TrainConfig.model_validate(_with_old_defaults(read_json(model_dir, CONFIG)))
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
    return LoadedModel(model, cfg, list(labels), meta, digest, model_dir, signature)


def _check_signature(
    model_dir: Path, key: bytes | None, required: bool
) -> Literal["verified", "unsigned", "not checked"]:
    if key is None:
        return "not checked"
    if verify_signature(model_dir, key):
        return "verified"
    if required:
        raise ValueError(f"{model_dir} has no {SIGNATURE}; refusing an unsigned model (retrain it)")
    return "unsigned"


def _with_old_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A config.json as read, with the fields it predates set to what they meant when it was written."""
    model = config.get("model")
    if isinstance(model, dict):
        for name, value in _MODEL_DEFAULTS_BEFORE.items():
            model.setdefault(name, value)
    return config


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
    "SIGNATURE",
    "TIMING",
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
    "sign",
    "split_wall_clock",
    "store_key",
    "verify_signature",
    "write_json",
    "write_tensors",
]
