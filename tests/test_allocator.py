"""The malloc settings' bound: freed heap memory kept by glibc goes back to the OS."""

from __future__ import annotations

import pytest

from maml_core import allocator

MIB = 1 << 20


def test_release_free_memory_hands_kept_heap_memory_back(monkeypatch):
    if not allocator.tune_allocator() or allocator.resident_bytes() is None:
        pytest.skip("glibc's malloc settings are not in effect in this process")
    monkeypatch.setattr(allocator, "_level", None)
    assert allocator.release_free_memory(64 * MIB) is None  # the first call takes the level only
    blocks = [bytearray(MIB) for _ in range(300)]  # heap blocks (under the mmap threshold)
    grown = allocator.resident_bytes()
    del blocks
    kept = allocator.resident_bytes()
    assert kept > grown - 64 * MIB  # freed, but kept by the heap (under the trim threshold)
    released = allocator.release_free_memory(64 * MIB)
    after = allocator.resident_bytes()
    assert after < kept - 200 * MIB
    assert released is not None and abs(released - (kept - after)) < 32 * MIB
    assert abs(allocator._level - after) < 16 * MIB  # the level is what the trim left
    assert allocator.release_free_memory(64 * MIB) is None  # no growth since: nothing to do


def test_release_counts_growth_from_what_the_last_release_left(monkeypatch):
    # Growth is measured from the level just after the last trim, not from a later call's: a
    # process whose heap cannot shrink by itself (blocks that stay in use sit above the free
    # memory, as after a held-out evaluation) still hands back what it keeps beyond the margin.
    if not allocator.tune_allocator() or allocator.resident_bytes() is None:
        pytest.skip("glibc's malloc settings are not in effect in this process")
    monkeypatch.setattr(allocator, "_level", None)
    assert allocator.release_free_memory(64 * MIB) is None
    assert allocator.trim() is not None
    level = allocator._level  # what the trim left
    assert abs(level - allocator.resident_bytes()) < 16 * MIB
    blocks = [bytearray(MIB) for _ in range(100)]  # 100 MiB more, still in use
    assert allocator.resident_bytes() > level + 90 * MIB
    assert allocator.release_free_memory(64 * MIB) is not None  # grown past the margin
    assert allocator._level > level + 90 * MIB  # in use: the trim left it, the level follows
    assert allocator.release_free_memory(64 * MIB) is None
    del blocks


def test_meta_update_records_whether_a_release_ran(monkeypatch):
    # A trim that hands back nothing reads 0 MB, as no trim does; memory_trimmed tells them apart.
    if not allocator.tune_allocator() or allocator.resident_bytes() is None:
        pytest.skip("glibc's malloc settings are not in effect in this process")
    from maml_core.config import build_config
    from maml_core.trainer import MetaLearner

    learner = MetaLearner(build_config({"meta_batch_size": 2, "episodes_per_task": 2,
                                        "task": {"horizon": 10},
                                        "policy": {"hidden_sizes": [8]}}))
    tasks = learner.sample_tasks(0)
    pre = learner.collect(learner.meta_params, tasks, 0, "pre")
    post = learner.collect(learner.adapt(pre), tasks, 0, "post")
    monkeypatch.setattr(allocator, "_level", allocator.resident_bytes() * 4)
    stats = learner.meta_update(pre, post)  # far under the level: no release
    assert stats["memory_trimmed"] == 0.0 and stats["memory_released_mb"] == 0.0
    grown_past_the_margin = allocator.resident_bytes() - allocator.TRIM_THRESHOLD - 64 * MIB
    monkeypatch.setattr(allocator, "_level", grown_past_the_margin)
    stats = learner.meta_update(pre, post)
    assert stats["memory_trimmed"] == 1.0 and stats["memory_released_mb"] >= 0.0
    assert abs(allocator._level - allocator.resident_bytes()) < 16 * MIB  # what the trim left


def test_peak_resident_counts_from_the_last_reset():
    if not allocator.reset_peak_resident() or allocator.peak_resident_bytes() is None:
        pytest.skip("no resettable peak (VmHWM, /proc/self/clear_refs) on this system")
    start = allocator.resident_bytes()
    assert abs(allocator.peak_resident_bytes() - start) < 16 * MIB  # the peak starts here
    block = bytearray(300 * MIB)  # zero-filled: every page resident
    grown = allocator.resident_bytes()
    assert grown > start + 250 * MIB
    del block  # 300 MiB is over the mmap threshold: unmapped at once
    assert allocator.resident_bytes() < grown - 250 * MIB
    assert allocator.peak_resident_bytes() > grown - 4 * MIB  # the peak stays (counters lag)
    assert allocator.reset_peak_resident()
    assert allocator.peak_resident_bytes() < grown - 250 * MIB  # a new peak, from now
    assert allocator.process_peak_bytes() > grown - 4 * MIB  # the process's, kept across resets
