"""The stage store's durability policy: with ``sync="checkpoint"`` stage outputs are fsynced in
one batch by ``sync()``, with ``sync="write"`` as each is written."""

from __future__ import annotations

import os

import pandas as pd
import torch

from flows.store import StageStore
from flows.writer import BackgroundWriter


def _count_fsyncs(monkeypatch) -> list[str]:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def _write_iteration(store: StageStore) -> None:
    store.save_tensors(0, "theta", {"w": torch.arange(6.0).reshape(2, 3)}, {"note": 1})
    store.save_table(0, "tasks", pd.DataFrame({"task_id": [0, 1], "goal_x": [0.1, -0.2]}))


def test_write_policy_fsyncs_every_file_and_folder(tmp_path, monkeypatch):
    synced = _count_fsyncs(monkeypatch)
    store = StageStore(tmp_path, "run", sync="write")
    _write_iteration(store)
    names = sorted(os.path.basename(p) for p in synced)
    # each file is fsynced under its temporary name, then its folder after the rename
    assert sum(n.endswith(".tmp") for n in names) == 3
    assert names.count("000000") == 3


def test_checkpoint_policy_defers_fsync_to_one_batch(tmp_path, monkeypatch):
    synced = _count_fsyncs(monkeypatch)
    writer = BackgroundWriter()
    try:
        store = StageStore(tmp_path, "run", writer, sync="checkpoint")
        _write_iteration(store)
        store.drain()
        assert synced == []  # written and renamed into place, not yet fsynced
        folder = store.iteration_dir(0)
        assert {p.name for p in folder.iterdir()} == {"theta.safetensors", "theta.json",
                                                      "tasks.parquet"}
        store.sync()
        store.drain()
        assert sorted(synced) == sorted([str(folder / "tasks.parquet"),
                                         str(folder / "theta.json"),
                                         str(folder / "theta.safetensors"), str(folder)])
        tensors, record = store.load_tensors(0, "theta")  # SHA-256 checked on load
        assert torch.equal(tensors["w"], torch.arange(6.0).reshape(2, 3))
        assert record["note"] == 1
        synced.clear()
        store.sync()  # nothing new to sync
        store.drain()
        assert synced == []
    finally:
        writer.close()


def test_sync_skips_outputs_pruned_before_it(tmp_path, monkeypatch):
    synced = _count_fsyncs(monkeypatch)
    writer = BackgroundWriter()
    try:
        store = StageStore(tmp_path, "run", writer, sync="checkpoint")
        for it in range(3):
            store.save_tensors(it, "theta", {"w": torch.full((2,), float(it))})
        store.prune(1)
        store.sync()
        store.drain()
        assert store.iterations() == [2]
        assert all("000002" in p for p in synced) and synced
    finally:
        writer.close()
