"""Checkpoints: parameters, optimizer state, iteration, RNG state and config.

A checkpoint is two files written atomically (temporary file, fsync, rename): tensors in
``<name>.safetensors`` and a JSON manifest ``<name>.json`` that records the iteration, the
config, the policy architecture, scalar optimizer state and the SHA-256 of the tensor file,
verified on load. The manifest is written last, so a checkpoint without one is incomplete and
ignored. No pickle is involved anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from maml_core.faults import fault_point

FORMAT_VERSION = 1
_UMASK = os.umask(0)
os.umask(_UMASK)
_NAME = re.compile(r"^iter-(\d{6,})\.json$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or does not fit the policy."""


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.

    ``durable``: fsync the file and its folder before returning, so that it also survives a
    power loss. Without it the write is still atomic and survives a killed process (the kernel
    holds it); ``fsync_paths`` makes a batch of such writes durable later."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            half = len(data) // 2
            fh.write(data[:half])
            fault_point(f"atomic-write:{path.name}:half-written")
            fh.write(data[half:])
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        fault_point(f"atomic-write:{path.name}:before-rename")
        os.replace(tmp, path)
    except OSError as exc:  # e.g. a full disk: no temporary left, and the error names the file
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is None or exc.filename == tmp:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def fsync_paths(paths) -> None:
    """Make earlier non-durable writes of ``paths`` durable: fsync each file that still exists
    (a pruned one needs nothing), then each folder once."""
    folders = set()
    for path in map(Path, paths):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        folders.add(path.parent)
    for folder in sorted(folders):
        if folder.is_dir():
            _fsync_dir(folder)


def remove_stale_temporaries(directory: str | Path) -> int:
    """Delete the temporary files of writes that a crash interrupted (never renamed into
    place, so never read); returns how many were removed."""
    removed = 0
    for tmp in Path(directory).rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict | None = None,
                 durable: bool = True) -> str:
    """Atomically save tensors as safetensors; returns the file's SHA-256."""
    data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                   metadata={k: str(v) for k, v in (metadata or {}).items()})
    atomic_write_bytes(path, data, durable)
    return sha256(data)


def load_tensors(path: str | Path, expected_sha256: str | None = None) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"tensor file {str(path)!r} does not exist")
    data = path.read_bytes()
    if expected_sha256 is not None and sha256(data) != expected_sha256:
        raise CheckpointError(f"{str(path)!r} is corrupt: its SHA-256 does not match the one "
                              "recorded when it was written")
    try:
        return st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{str(path)!r} is not a valid safetensors file ({exc}); "
                              "checkpoints are never read from pickle files") from None


def save_checkpoint(directory: str | Path, iteration: int, meta_params: dict[str, Tensor],
                    optimizer_tensors: dict[str, Tensor], optimizer_meta: dict, config: dict,
                    architecture: dict, extra: dict | None = None) -> Path:
    """Write ``iter-<iteration>.{safetensors,json}`` in ``directory``; returns the JSON path."""
    directory = Path(directory)
    stem = f"iter-{iteration:06d}"
    tensors = {f"param/{k}": v for k, v in meta_params.items()}
    tensors.update({f"optim/{k}": v for k, v in optimizer_tensors.items()})
    tensors["rng/torch"] = torch.get_rng_state()
    digest = save_tensors(directory / f"{stem}.safetensors", tensors)
    manifest = {"format_version": FORMAT_VERSION, "iteration": int(iteration),
                "tensors": f"{stem}.safetensors", "sha256": digest, "config": config,
                "architecture": architecture, "optimizer": optimizer_meta, **(extra or {})}
    path = directory / f"{stem}.json"
    try:
        atomic_write_bytes(path, json.dumps(manifest, indent=1, sort_keys=True).encode())
    except Exception:  # e.g. a full disk: leave no tensor file without its manifest
        (directory / f"{stem}.safetensors").unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> tuple[dict, dict[str, Tensor], dict[str, Tensor]]:
    """Read a checkpoint manifest (``.json``) or its directory (latest). Returns
    ``(manifest, meta_params, optimizer_tensors)``; the checksum is verified."""
    path = Path(path)
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"no complete checkpoint in {str(path)!r}")
        path = latest
    if path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read "
                              f"({exc.strerror or exc})") from None
    if raw[:1] == b"\x80" or path.suffix.lower() in (".pkl", ".pickle", ".pt", ".pth"):
        raise CheckpointError(f"{str(path)!r} is not a checkpoint manifest (it looks like a "
                              "pickle file, which is never loaded); give the iter-NNNNNN.json "
                              "of a checkpoint or its folder")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"checkpoint manifest {str(path)!r} is not valid JSON ({exc}); "
                              "give the iter-NNNNNN.json of a checkpoint or its folder"
                              ) from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r} is not a checkpoint manifest of format "
                              f"{FORMAT_VERSION}")
    bad = [k for k in ("iteration", "tensors", "sha256")
           if not isinstance(manifest.get(k), int if k == "iteration" else str)
           or isinstance(manifest.get(k), bool)]
    if bad:
        raise CheckpointError(f"checkpoint manifest {str(path)!r} lacks valid {bad}")
    if Path(manifest["tensors"]).name != manifest["tensors"] or \
            not manifest["tensors"].endswith(".safetensors"):
        raise CheckpointError(f"checkpoint manifest {str(path)!r}: 'tensors' must name a "
                              f".safetensors file beside the manifest, got "
                              f"{manifest['tensors']!r}")
    tensors = load_tensors(path.parent / manifest["tensors"], manifest["sha256"])
    params = {k[6:]: v for k, v in tensors.items() if k.startswith("param/")}
    optim = {k[6:]: v for k, v in tensors.items() if k.startswith("optim/")}
    if "rng/torch" in tensors:
        manifest["rng_torch"] = tensors["rng/torch"]
    return manifest, params, optim


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m and (directory / p.name.replace(".json", ".safetensors")).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def check_params_fit(params: dict[str, Tensor], expected: dict[str, Tensor], source: str) -> None:
    """Raise a clear error if ``params`` do not match the policy's names and shapes."""
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{source} does not fit this policy: missing {missing}, "
                              f"unexpected {extra} (was it saved with another architecture?)")
    for k, v in expected.items():
        if tuple(params[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: parameter {k!r} has shape "
                                  f"{tuple(params[k].shape)}, the policy expects "
                                  f"{tuple(v.shape)} (another architecture?)")
