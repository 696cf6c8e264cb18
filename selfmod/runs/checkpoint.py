"""Checkpoints: tensors as safetensors plus a JSON manifest with their sha256, written atomically.

Layout in ``run_dir/checkpoints``::

    ckpt-00001200.safetensors   every tensor of the run state, flat names ("params/0.weight")
    ckpt-00001200.json          {"step", "file", "sha256", "bytes", "meta": {...}}

The tensors are written first, then the manifest (each temp file, fsync, rename, fsync the
folder). A checkpoint is *complete* when its manifest exists and the tensors' sha256 matches, so
``kill -9`` at any moment leaves the previous complete checkpoint loadable. Only the last
``keep`` complete checkpoints are kept (manifest removed first).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save
from torch import Tensor

from selfmod.errors import SelfmodError
from selfmod.runs.files import atomic_write_bytes, atomic_write_text

FOLDER = "checkpoints"


class CheckpointError(SelfmodError):
    """No complete checkpoint could be loaded."""


def _name(step: int) -> str:
    return f"ckpt-{step:08d}"


def save_checkpoint(
    run_dir: str | Path, step: int, tensors: dict[str, Tensor], meta: dict[str, Any], keep: int = 3
) -> Path:
    """Write checkpoint ``step`` atomically, prune to the last ``keep``; return the manifest."""
    folder = Path(run_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    weights = folder / f"{_name(step)}.safetensors"
    atomic_write_bytes(weights, data)
    manifest = {
        "step": step,
        "file": weights.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "torch": torch.__version__,
        "meta": meta,
    }
    path = folder / f"{_name(step)}.json"
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True))
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
        (folder / old.name.replace(".json", ".safetensors")).unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Manifests, oldest first (complete or not: see :func:`load_checkpoint`)."""
    folder = Path(run_dir) / FOLDER
    return sorted(folder.glob("ckpt-*.json")) if folder.is_dir() else []


def load_checkpoint(manifest_path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, manifest)``; raises :class:`CheckpointError` if incomplete or corrupted."""
    manifest_path = Path(manifest_path)
    try:
        manifest = json.loads(manifest_path.read_text())
        data = (manifest_path.parent / manifest["file"]).read_bytes()
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {manifest_path.name} is unreadable: {err}") from None
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise CheckpointError(
            f"checkpoint {manifest_path.name}: sha256 of {manifest['file']} does not match"
        )
    return load(data), manifest


def load_latest(
    run_dir: str | Path, at_most: int | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The newest complete checkpoint (with ``step <= at_most`` if given); skips torn ones."""
    errors = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            tensors, manifest = load_checkpoint(path)
        except CheckpointError as err:
            errors.append(str(err))
            continue
        if at_most is None or manifest["step"] <= at_most:
            return tensors, manifest
    detail = f" ({'; '.join(errors)})" if errors else ""
    raise CheckpointError(f"no complete checkpoint in {Path(run_dir) / FOLDER}{detail}")
