"""The malloc settings' bound: freed heap memory kept by glibc goes back to the OS."""

from __future__ import annotations

import pytest

from maml_core import allocator

MIB = 1 << 20


def test_release_free_memory_hands_kept_heap_memory_back(monkeypatch):
    if not allocator.tune_allocator() or allocator.resident_bytes() is None:
        pytest.skip("glibc's malloc settings are not in effect in this process")
    monkeypatch.setattr(allocator, "_resident_after_release", None)
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
    assert allocator._resident_after_release is None  # the next call takes the level again
    assert allocator.release_free_memory(64 * MIB) is None
    assert allocator.release_free_memory(64 * MIB) is None
