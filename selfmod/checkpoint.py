"""Checkpoints: tensors as safetensors plus a JSON manifest with their sha256, written atomically.

Layout in ``run_dir/checkpoints``::

    ckpt-00001200.safetensors   every tensor of the run state, flat names ("params/0.weight")
    ckpt-00001200.json          {"step", "file", "sha256", "bytes", "torch", "meta",
                                 ["run_id"], "manifest_sha256"}

The tensors are written first, then the manifest (each temp file, fsync, rename, fsync the
folder). A checkpoint is *complete* when its manifest exists, its ``manifest_sha256`` (sha256 of
the canonical JSON of every other key, ``meta`` included) matches, and the tensors' sha256
matches, so ``kill -9`` at any moment leaves the previous complete checkpoint loadable. Only the
last ``keep`` checkpoints are kept (manifest removed first).

A manifest names only its own tensors file: ``ckpt-N.json`` may name ``ckpt-N.safetensors``, a
plain file (not a link) in the same folder, and nothing else. What this does and does not
protect against: ``docs/security.md``.
"""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch import Tensor

from selfmod.errors import SelfmodError
from selfmod.files import atomic_write_file, atomic_write_text, private_dir, read_bytes

FOLDER = "checkpoints"
# the keys every manifest has, with their types (bool is excluded from int below)
_KEYS: dict[str, type | tuple[type, ...]] = {
    "step": int,
    "file": str,
    "sha256": str,
    "bytes": int,
    "meta": dict,
    "manifest_sha256": str,
}


class CheckpointError(SelfmodError):
    """No complete checkpoint could be loaded."""


def _name(step: int) -> str:
    return f"ckpt-{step:08d}"


def canonical_json(value: Any) -> bytes:
    """The bytes a hash is taken over: sorted keys, no spaces, UTF-8 (NaN/inf as JSON allows)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of every key of ``manifest`` but ``manifest_sha256``."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def _remove_stale_temp_files(folder: Path) -> None:
    """Temp files (``.ckpt-*.tmp``) a kill left behind: never part of a checkpoint."""
    for tmp in folder.glob(".ckpt-*.tmp"):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    tensors: dict[str, Tensor],
    meta: dict[str, Any],
    keep: int = 3,
    *,
    run_id: str | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically, prune to the last ``keep``; return the manifest.

    ``run_id`` (optional) is stored in the manifest; :func:`load_checkpoint` with the same
    ``run_id`` refuses a checkpoint of another run copied in, and pruning removes only this
    run's own checkpoints.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (got {keep}); the newest checkpoint is always kept")
    folder = Path(run_dir) / FOLDER
    try:
        private_dir(folder)
    except NotADirectoryError:
        raise CheckpointError(f"{folder} is a symbolic link; it must be the run's folder") from None
    _remove_stale_temp_files(folder)
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    weights = folder / f"{_name(step)}.safetensors"
    # written as it is serialized: one copy of the tensors in memory, not a whole-file buffer
    digest, size = atomic_write_file(weights, lambda tmp: save_file(cpu, tmp))
    manifest: dict[str, Any] = {
        "step": step,
        "file": weights.name,
        "sha256": digest,
        "bytes": size,
        "torch": torch.__version__,
        "meta": meta,
    }
    if run_id is not None:
        manifest["run_id"] = run_id
    manifest["manifest_sha256"] = manifest_digest(manifest)
    path = folder / f"{_name(step)}.json"
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True))
    for old in [p for p in list_checkpoints(run_dir) if _written_by(p, run_id)][:-keep]:
        old.unlink(missing_ok=True)
        (folder / old.name.replace(".json", ".safetensors")).unlink(missing_ok=True)
    return path


def _written_by(manifest: Path, run_id: str | None) -> bool:
    """Whether ``manifest`` is a checkpoint of run ``run_id`` (any, without one): only its own
    are pruned, never one of another run or one that cannot be read."""
    if run_id is None:
        return True
    try:
        return json.loads(read_bytes(manifest)).get("run_id") == run_id
    except (OSError, ValueError, AttributeError):
        return False


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Manifests, oldest first (complete or not: see :func:`load_checkpoint`)."""
    folder = Path(run_dir) / FOLDER
    if folder.is_symlink():
        raise CheckpointError(f"{folder} is a symbolic link; it must be the run's folder")
    return sorted(folder.glob("ckpt-*.json")) if folder.is_dir() else []


def _plain_file(path: Path, what: str) -> None:
    """Raise unless ``path`` is a regular file (a symlink, folder or device is refused)."""
    try:
        mode = path.lstat().st_mode
    except OSError as err:
        raise CheckpointError(f"{what} {path.name} is unreadable: {err.strerror}") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{what} {path.name} must be a plain file, not a link or folder")


def check_manifest(manifest: Any, manifest_path: Path, run_id: str | None = None) -> None:
    """Raise :class:`CheckpointError` unless ``manifest`` is well formed, unmodified (its
    ``manifest_sha256``), names exactly its sibling ``<stem>.safetensors`` and, when ``run_id``
    is given, belongs to that run."""
    name = manifest_path.name
    if not isinstance(manifest, dict):
        raise CheckpointError(f"checkpoint {name}: the manifest must be a JSON object")
    for key, kind in _KEYS.items():
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(
                f"checkpoint {name}: manifest key {key!r} is missing or not a "
                f"{kind.__name__ if isinstance(kind, type) else kind}; the manifest is damaged"
            )
    if manifest["manifest_sha256"] != manifest_digest(manifest):
        raise CheckpointError(
            f"checkpoint {name}: the manifest does not match its manifest_sha256 (edited)"
        )
    file = manifest["file"]
    expected = manifest_path.with_suffix(".safetensors").name
    if file != expected:
        raise CheckpointError(
            f"checkpoint {name}: manifest names {file!r}; a manifest may name only its own "
            f"tensors file {expected!r} in {manifest_path.parent}"
        )
    if run_id is not None and manifest.get("run_id") != run_id:
        raise CheckpointError(
            f"checkpoint {name} belongs to run {manifest.get('run_id')!r}, not to this run "
            f"({run_id!r}); it was copied in from elsewhere"
        )


def load_checkpoint(
    manifest_path: str | Path, *, run_id: str | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, manifest)``; raises :class:`CheckpointError` if incomplete, corrupted,
    edited, of another run (``run_id`` given) or naming a file outside its folder."""
    manifest_path = Path(manifest_path)
    _plain_file(manifest_path, "checkpoint manifest")
    try:
        manifest = json.loads(read_bytes(manifest_path).decode("utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {manifest_path.name} is unreadable: {err}") from None
    check_manifest(manifest, manifest_path, run_id)
    data_path = manifest_path.parent / manifest["file"]
    _plain_file(data_path, "checkpoint file")
    try:
        data = read_bytes(data_path)
    except OSError as err:
        raise CheckpointError(f"checkpoint file {data_path.name} is unreadable: {err}") from None
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise CheckpointError(
            f"checkpoint {manifest_path.name}: sha256 of {manifest['file']} does not match"
        )
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"checkpoint {manifest_path.name}: {manifest['file']} is not a safetensors file ({err})"
        ) from None
    return tensors, manifest


def load_latest(
    run_dir: str | Path, at_most: int | None = None, *, run_id: str | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The newest complete checkpoint (with ``step <= at_most`` if given); skips torn ones
    (and, with ``run_id``, those of another run)."""
    errors = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            tensors, manifest = load_checkpoint(path, run_id=run_id)
        except CheckpointError as err:
            errors.append(str(err))
            continue
        if at_most is None or manifest["step"] <= at_most:
            return tensors, manifest
    detail = f" ({'; '.join(errors)})" if errors else ""
    raise CheckpointError(f"no complete checkpoint in {Path(run_dir) / FOLDER}{detail}")
