"""The malloc settings' bound: freed heap memory kept by glibc goes back to the OS."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

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


# ------------------------------------------------------------- MAML_ALLOCATOR=jemalloc


def _restarting_program(tmp_path, env_updates):
    """A program that calls ``exec_requested_allocator`` as ``maml`` does, then prints the
    allocator it runs on; its exit code, stdout and stderr."""
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent("""
        import sys
        from maml_core.allocator import allocator_in_use, exec_requested_allocator
        exec_requested_allocator(sys.argv)
        print(allocator_in_use(), sys.argv[1:])
    """))
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAML_ALLOCATOR", "MAML_JEMALLOC_PATH", "LD_PRELOAD",
                        "MAML_ALLOCATOR_RESTARTED")}
    env.update(env_updates)
    done = subprocess.run([sys.executable, str(script), "an argument"], env=env,
                          capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout, done.stderr


def test_allocator_in_use_reads_the_process_maps():
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/maps")
    expected = "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "glibc"
    assert allocator.allocator_in_use() == expected


def test_unset_allocator_runs_on_as_it_is(tmp_path):
    code, out, _ = _restarting_program(tmp_path, {})
    assert code == 0 and out.split()[0] == allocator.allocator_in_use()


@pytest.mark.parametrize("env,message", [
    ({"MAML_ALLOCATOR": "tcmalloc"}, "MAML_ALLOCATOR='tcmalloc' is not an allocator this knows; "
     "set it to one of glibc, jemalloc"),
    ({"MAML_ALLOCATOR": "jemalloc", "MAML_JEMALLOC_PATH": "/nowhere/libjemalloc.so.2"},
     "no jemalloc library found at MAML_JEMALLOC_PATH='/nowhere/libjemalloc.so.2'; install it "
     "(Debian/Ubuntu: apt-get install libjemalloc2"),
])
def test_bad_allocator_requests_are_refused_before_work(tmp_path, env, message):
    code, out, err = _restarting_program(tmp_path, env)
    assert code != 0 and out == "" and message in err


def test_a_restart_that_does_not_load_jemalloc_stops_instead_of_looping(tmp_path):
    # A library that loads but is not jemalloc: the program restarts once, sees no jemalloc,
    # and says so.
    if not sys.platform.startswith("linux"):
        pytest.skip("LD_PRELOAD is Linux's")
    import ctypes.util

    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm to preload")
    code, out, err = _restarting_program(tmp_path, {"MAML_ALLOCATOR": "jemalloc",
                                                    "MAML_JEMALLOC_PATH": libm})
    assert code != 0 and out == ""
    assert f"restarted with LD_PRELOAD={libm!r} but jemalloc is not loaded" in err


def test_jemalloc_requested_restarts_the_program_on_it(tmp_path):
    if allocator.find_jemalloc() is None or not sys.platform.startswith("linux"):
        pytest.skip("no jemalloc on this machine (apt-get install libjemalloc2)")
    code, out, err = _restarting_program(tmp_path, {"MAML_ALLOCATOR": "jemalloc"})
    assert code == 0, err
    assert out.strip() == "jemalloc ['an argument']"  # the same program, the same arguments
