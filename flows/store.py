"""The stage store: every stage's outputs on disk, addressed by run and iteration.

Layout under ``<root>/<run_id>/``::

    config.json                       the resolved run config
    iterations/000007/tasks.parquet   sample_tasks
    iterations/000007/theta.safetensors       meta-parameters + optimizer state at the start
    iterations/000007/pre.safetensors         collect_rollouts (pre-adaptation)
    iterations/000007/adapted.safetensors     adapt
    iterations/000007/pre1.safetensors        with inner.fresh_episodes: the episodes of the
    iterations/000007/adapted1.safetensors    policies adapted once and the second step, then
                                              pre2/adapted2, ... (one pair per later step)
    iterations/000007/post.safetensors        collect_rollouts (post-adaptation)
    iterations/000007/meta_update.safetensors meta_update: new meta-parameters + optimizer state
    iterations/000007/<stage>.json            statistics and checksums of each output
    checkpoints/iter-000010.{safetensors,json}
    evaluations/iter-000010.parquet
    validations/iter-000010.parquet   with evaluation.validation_tasks: the validation
    selection.json                    curves, and the scores the model is selected on

Tensors go to safetensors, tables to parquet, small records to JSON; every write is atomic
(temporary file, rename) and every tensor file's SHA-256 is checked on load. Only the last
``keep_last`` iterations are kept; checkpoints stay.

Durability: a killed process loses nothing that was renamed into place (the kernel holds it).
Against a power loss, a store made with ``sync="checkpoint"`` (the flow's, with a background
writer) fsyncs the stage outputs in one batch when ``sync()`` is called, which the flow does
before every checkpoint: resume starts from the last checkpoint, so the iterations after it are
recomputed anyway. That saves two fsyncs per file per iteration (``bench/pipeline_overhead.py``).
``sync="write"`` fsyncs every file as it is written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Literal

import pandas as pd
from torch import Tensor

from maml_core.checkpoint import (
    atomic_write_bytes,
    fsync_paths,
    load_tensors,
    remove_stale_temporaries,
    save_tensors,
)
from maml_core.episodes import Episodes
from maml_core.faults import fault_point


class StoreError(RuntimeError):
    """The stage store lacks an input, or cannot be written."""


class StageStore:
    def __init__(self, root: str | Path, run_id: str, writer=None,
                 sync: Literal["write", "checkpoint"] = "write"):
        """``writer`` (a ``flows.writer.BackgroundWriter``) makes stage-output writes
        asynchronous; without one every write completes before the call returns. ``sync``:
        when stage outputs are fsynced (module docstring)."""
        self.root = Path(root)
        self.run_id = run_id
        self.run_dir = self.root / run_id
        self.writer = writer
        self.durable = sync == "write"
        self._unsynced: list[Path] = []  # touched only by the thread that writes

    def _write(self, fn, *args) -> None:
        def guarded() -> None:
            try:
                fn(*args)
            except OSError as exc:  # full disk, file-size limit, read-only, not a folder...
                raise self.write_error(exc) from exc

        if self.writer is None:
            guarded()
        else:
            self.writer.submit(guarded)

    def _put(self, path: Path, data: bytes) -> None:
        """A stage output, written atomically; durable now or at the next ``sync``."""
        atomic_write_bytes(path, data, self.durable)
        self._written(path)

    def _written(self, path: Path) -> None:
        if not self.durable:
            self._unsynced.append(path)

    def sync(self) -> None:
        """Make every stage output written so far durable (fsync, in one batch, after the
        writes queued before it). ``drain`` waits for it."""
        def flush() -> None:
            paths, self._unsynced = self._unsynced, []
            fsync_paths(paths)

        self._write(flush)

    def write_error(self, exc: OSError) -> StoreError:
        """The clear error for a failed write (``exc``): the store, the reason and the fix."""
        where = f" writing {exc.filename!r}" if getattr(exc, "filename", None) else ""
        return StoreError(f"the stage store {str(self.run_dir)!r} cannot be written "
                          f"({exc.strerror or exc}{where}); free space or set MAML_HOME to a "
                          "writable folder, then resume the run")

    # ----------------------------------------------------------------- paths
    def iteration_dir(self, iteration: int) -> Path:
        return self.run_dir / "iterations" / f"{iteration:06d}"

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def evaluation_dir(self) -> Path:
        return self.run_dir / "evaluations"

    def ensure_writable(self) -> None:
        """Fail early, with a clear message, if the store cannot be written."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write-probe"
            atomic_write_bytes(probe, b"ok")
            probe.unlink()
        except OSError as exc:
            raise StoreError(f"the stage store {str(self.run_dir)!r} cannot be written "
                             f"({exc.strerror or exc}); free space or set MAML_HOME to a "
                             "writable folder") from None

    # ----------------------------------------------------------------- generic records
    def write_json(self, path: Path, record: dict, durable: bool = True) -> None:
        data = json.dumps(record, indent=1, sort_keys=True).encode()
        try:
            if durable:
                atomic_write_bytes(path, data)
            else:
                self._put(path, data)
        except OSError as exc:
            raise self.write_error(exc) from exc

    def read_json(self, path: Path) -> dict:
        if not path.is_file():
            raise StoreError(f"{str(path)!r} is not in the stage store")
        try:
            record = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(f"{str(path)!r} in the stage store is not valid JSON ({exc}); "
                             "it was not written by this pipeline") from None
        if not isinstance(record, dict):
            raise StoreError(f"{str(path)!r} in the stage store does not hold a JSON object")
        return record

    def save_config(self, config: dict) -> None:
        self.write_json(self.run_dir / "config.json", config)

    def load_config(self) -> dict:
        return self.read_json(self.run_dir / "config.json")

    # ----------------------------------------------------------------- stage outputs
    def save_table(self, iteration: int, name: str, table: pd.DataFrame) -> Path:
        path = self.iteration_dir(iteration) / f"{name}.parquet"
        self._write(lambda: self._put(path, table.to_parquet(index=False)))
        return path

    def load_table(self, iteration: int, name: str) -> pd.DataFrame:
        path = self.iteration_dir(iteration) / f"{name}.parquet"
        if not path.is_file():
            raise StoreError(f"no {name!r} table for iteration {iteration} of run "
                             f"{self.run_id} in {str(self.run_dir)!r}")
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise StoreError(f"{str(path)!r} in the stage store is not a readable parquet "
                             f"file ({type(exc).__name__}); it was not written by this "
                             "pipeline") from None

    def save_tensors(self, iteration: int, name: str, tensors: dict[str, Tensor],
                     record: dict | None = None) -> None:
        """Tensors to ``<name>.safetensors``, then ``<name>.json`` with their SHA-256 (the
        record is written last: an output without one is incomplete)."""
        directory = self.iteration_dir(iteration)

        def write() -> None:
            tensor_path = directory / f"{name}.safetensors"
            digest = save_tensors(tensor_path, tensors, durable=self.durable)
            self._written(tensor_path)
            try:
                self.write_json(directory / f"{name}.json", {**(record or {}), "sha256": digest},
                                durable=self.durable)
            except BaseException:  # no tensor file without its record is left behind
                tensor_path.unlink(missing_ok=True)
                (directory / f"{name}.json").unlink(missing_ok=True)
                raise

        self._write(write)

    def load_tensors(self, iteration: int, name: str) -> tuple[dict[str, Tensor], dict]:
        directory = self.iteration_dir(iteration)
        record_path = directory / f"{name}.json"
        if not record_path.is_file():
            raise StoreError(f"no {name!r} output for iteration {iteration} of run "
                             f"{self.run_id} in {str(self.run_dir)!r} (pruned, or the stage "
                             "has not run)")
        record = self.read_json(record_path)
        return load_tensors(directory / f"{name}.safetensors", record["sha256"]), record

    def save_episodes(self, iteration: int, name: str, episodes: Episodes,
                      record: dict | None = None) -> None:
        self.save_tensors(iteration, name, episodes.to_tensors(), record)

    def load_episodes(self, iteration: int, name: str) -> Episodes:
        tensors, _ = self.load_tensors(iteration, name)
        return Episodes.from_tensors(tensors)

    def has_table(self, iteration: int, name: str) -> bool:
        return (self.iteration_dir(iteration) / f"{name}.parquet").is_file()

    def has(self, iteration: int, name: str) -> bool:
        return (self.iteration_dir(iteration) / f"{name}.json").is_file()

    def iterations(self) -> list[int]:
        base = self.run_dir / "iterations"
        if not base.is_dir():
            return []
        return sorted(int(p.name) for p in base.iterdir() if p.name.isdigit())

    def prune(self, keep_last: int) -> None:
        """Drop all but the last ``keep_last`` iterations (checkpoints are kept apart).

        Each folder is first renamed out of the listing (atomic), then deleted, so that a crash
        in the middle of a deletion never leaves a half-deleted iteration behind; such
        leftovers (``.<iteration>.pruned``) are deleted by the next prune."""
        self.drain()
        for it in self.iterations()[:-keep_last]:
            src = self.iteration_dir(it)
            doomed = src.with_name(f".{src.name}.pruned")
            try:
                os.replace(src, doomed)
            except OSError:  # e.g. a leftover of the same name: delete that first
                shutil.rmtree(doomed, ignore_errors=True)
                os.replace(src, doomed)
            fault_point(f"store:prune:{it}")
        self._remove_pruned()

    def _remove_pruned(self) -> int:
        base = self.run_dir / "iterations"
        leftovers = list(base.glob(".*.pruned")) if base.is_dir() else []
        for leftover in leftovers:
            shutil.rmtree(leftover, ignore_errors=True)
        return len(leftovers)

    def remove_leftovers(self) -> int:
        """After a crash: delete the temporary files of interrupted writes (never renamed into
        place, so never read) and the folders of an interrupted prune; returns how many."""
        return remove_stale_temporaries(self.run_dir) + self._remove_pruned()

    def save_evaluation(self, iteration: int, table: pd.DataFrame,
                        kind: str = "evaluation") -> Path:
        """An adaptation curve at ``iteration``: ``evaluations/`` for the held-out tasks,
        ``validations/`` for model selection's validation tasks."""
        folder = {"evaluation": self.evaluation_dir,
                  "validation": self.run_dir / "validations"}[kind]
        path = folder / f"iter-{iteration:06d}.parquet"
        self._write(lambda: atomic_write_bytes(path, table.to_parquet(index=False)))
        return path

    def drain(self) -> None:
        """Wait for pending writes (no-op without a background writer)."""
        if self.writer is not None:
            self.writer.drain()
