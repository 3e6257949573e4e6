"""Keep freed tensor memory in the process instead of handing it back to the OS (glibc only).

A meta-iteration allocates and frees thousands of short-lived tensors of a few megabytes (the
activations of 20 tasks x 2000 steps x 64 units and their derivatives). With glibc's default
settings, blocks of that size are served by ``mmap`` or released by trimming the heap on
``free``, so every new tensor page-faults its memory in again: on a 2-core machine that was
about 400,000 page faults and a third of the CPU time of a TRPO meta-update. Raising the mmap
threshold to glibc's maximum (32 MiB) and the trim threshold to 512 MiB serves these blocks from
the heap and reuses them. Peak memory is unchanged (it is the same working set); at most 512 MiB
of free memory stays reserved at the top of the heap.

``tune_allocator`` is called once per process by the rollout and meta-objective code. It does
nothing off glibc, when ``MAML_MALLOC_TUNING=0``, or when the process was started with its own
malloc settings (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES``).
It changes no numbers, only where memory comes from.

What the heap keeps is not bounded by the trim threshold alone: every thread that allocates
(the MuJoCo stepping threads, Prefect's workers) gets an arena of its own, and freed blocks
between live ones are never trimmed. Over a long MuJoCo run the process grew by about 5 MB per
meta-iteration (1.8 GB at iteration 7, 3.8 GB at 336), though what it used stayed flat:
``malloc_trim(0)`` took a grown process from 1,035 MB back to 494 MB. ``release_free_memory``,
called once per meta-iteration, hands the free memory back with ``malloc_trim`` whenever the
resident size has grown by ``TRIM_THRESHOLD`` over what the last trim left (before the first
trim: over the size at the first call), so the memory an iteration reuses stays in the heap
while the process holds less than that much beyond it. A release costs little: the trim call
took 65 ms in a halfcheetah-dir run (20 tasks x 20 episodes), and the iteration after it, which
faults about 670 MB in again, was not measurably slower (``bench/memory_release.py``).

Why the level is what the last trim left, not the size one iteration later (the rule before):
before a run's first held-out evaluation, ``free`` at the end of an update trims the heap's top
itself, so the size after an update is what the next iteration still holds. After one, blocks
that stay in use sit high in the heap and nothing below them goes back on ``free``: the size
after an update is then the iteration's whole working set, and a level taken there let the
process keep it, and its fragmented growth, from one iteration to the next. In an ant-vel run
(20 tasks x 20 episodes, resumed from 550 to 650, an evaluation at 600) the peak per
meta-iteration (``memory_peak_mb``) had a median of 1,993 MB over 550-599 and 2,767 MB, still
rising, over 601-649, the process never trimming again. Measured side by side (ant-vel, 20 x
20, 12 meta-iterations from a random start, evaluations on 10 tasks at 4, 8 and 12; both arms
at once, one thread each): with the old level the process held 2.2-2.5 GB between iterations
after the first evaluation, the peak per meta-iteration had a median of 2,478 MB after the
evaluations against 2,048 MB before, the evaluations at 8 and 12 peaked at 3,133 and 3,045 MB
and the process at 3,259 MB; with this one it held 0.88 GB, 2,293 against 1,998 MB, 1,656 and
1,677 MB, and 2,701 MB. What remains after an evaluation (+15% here) is fragmentation: the
iteration's blocks no longer fit where they did (with 40 ant-dir tasks the peak went from 3.6 to
6.4-7.9 GB). An evaluation in a thread of its own (an arena of its own) made that worse in a
small run (docs/results/EXPERIMENTS.md); preloading jemalloc avoids it (README, Reliability;
``MAML_ALLOCATOR=jemalloc`` makes ``maml`` restart itself under it, ``exec_requested_allocator``),
and the glibc calls here then act on glibc's heap, which holds next to nothing. ``memory_peak_mb``
(per meta-iteration, ``peak_resident_bytes`` after ``reset_peak_resident``) records it,
``memory_peak_evaluate_mb`` an evaluation's, and ``memory_peak_process_mb``, logged once at
the end, the whole process's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MIB = 1 << 20
MMAP_THRESHOLD = 32 * MIB  # glibc's upper limit for this setting on 64-bit systems
TRIM_THRESHOLD = 512 * MIB

# Where Debian, Ubuntu and Fedora put jemalloc (``apt-get install libjemalloc2``, ``dnf install
# jemalloc``): looked for after ``MAML_JEMALLOC_PATH``, before the linker's own search.
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2",
                  "/usr/local/lib/libjemalloc.so.2")
ALLOCATORS = ("glibc", "jemalloc")
_EXEC_GUARD = "MAML_ALLOCATOR_RESTARTED"


class AllocatorError(RuntimeError):
    """``MAML_ALLOCATOR`` asks for an allocator this machine cannot give."""


def allocator_in_use() -> str:
    """The malloc this process runs on: ``jemalloc`` when it is mapped in (preloaded), ``glibc``
    on glibc, else ``system``; ``unknown`` where ``/proc`` cannot tell."""
    try:
        with open("/proc/self/maps") as f:
            if "jemalloc" in f.read():
                return "jemalloc"
    except OSError:
        return "unknown"
    return "glibc" if _glibc() is not None else "system"


def _glibc():
    """The C library, if it is glibc (its malloc settings and ``malloc_trim``); else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None


def find_jemalloc() -> str | None:
    """A jemalloc shared library to preload: ``MAML_JEMALLOC_PATH``, else the first of
    ``JEMALLOC_PATHS`` that exists, else the linker's; None if there is none."""
    given = os.environ.get("MAML_JEMALLOC_PATH")
    if given:
        return given
    for path in JEMALLOC_PATHS:
        if os.path.exists(path):
            return path
    return ctypes.util.find_library("jemalloc")


def exec_requested_allocator(argv: list[str]) -> None:
    """With ``MAML_ALLOCATOR=jemalloc``, restart this program (``argv``, as ``sys.argv``) with
    jemalloc preloaded, unless it already runs on it; returns only when nothing needs to change.
    Same numbers, another heap: after held-out evaluations glibc's fragments and large
    meta-batches pay for it (README, Reliability). Raises ``AllocatorError`` for an unknown
    value, a missing library, or a restart that did not load it -- before any work starts."""
    wanted = os.environ.get("MAML_ALLOCATOR", "").strip().lower()
    if wanted in ("", "glibc", "default"):
        return
    if wanted not in ALLOCATORS:
        raise AllocatorError(f"MAML_ALLOCATOR={wanted!r} is not an allocator this knows; set it "
                             f"to one of {', '.join(ALLOCATORS)}, or unset it")
    if allocator_in_use() == "jemalloc":
        return
    if not sys.platform.startswith("linux"):
        raise AllocatorError("MAML_ALLOCATOR=jemalloc preloads jemalloc with LD_PRELOAD, which "
                             "needs Linux; unset MAML_ALLOCATOR")
    if os.environ.get(_EXEC_GUARD):
        raise AllocatorError(f"MAML_ALLOCATOR=jemalloc: restarted with LD_PRELOAD="
                             f"{os.environ.get('LD_PRELOAD', '')!r} but jemalloc is not loaded; "
                             "point MAML_JEMALLOC_PATH at a working libjemalloc.so")
    library = find_jemalloc()
    if library is None or (os.sep in library and not os.path.exists(library)):
        raise AllocatorError("MAML_ALLOCATOR=jemalloc: no jemalloc library found"
                             + (f" at MAML_JEMALLOC_PATH={library!r}" if library else "")
                             + "; install it (Debian/Ubuntu: apt-get install libjemalloc2; "
                             "Fedora: dnf install jemalloc) or set MAML_JEMALLOC_PATH, or "
                             "unset MAML_ALLOCATOR")
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (library, env.get("LD_PRELOAD")) if p)
    env[_EXEC_GUARD] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)


_done = False
_applied = False
_libc = None  # glibc, once the settings are applied: release_free_memory trims through it


def tune_allocator() -> bool:
    """Apply the malloc settings once per process; True if they are in effect."""
    global _done, _applied, _libc
    if _done:
        return _applied
    _done = True
    if not sys.platform.startswith("linux") or os.environ.get("MAML_MALLOC_TUNING") == "0":
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                     "GLIBC_TUNABLES")):
        return False
    libc = _glibc()
    if libc is None:  # not glibc (e.g. musl): leave it be
        return False
    try:
        mallopt = libc.mallopt
    except AttributeError:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                    and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _libc = libc if _applied else None
    return _applied


_level: int | None = None  # resident bytes just after the last release (first call: then)


def resident_bytes() -> int | None:
    """This process's resident memory (Linux ``/proc/self/statm``), or None elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release_free_memory(margin: int = TRIM_THRESHOLD) -> int | None:
    """``malloc_trim(0)`` if the malloc settings are in effect and the resident memory has grown
    by more than ``margin`` bytes over its level just after the last release (before the first
    release: at the first call). Returns the bytes the trim handed back (resident before minus
    after), None if it did not run."""
    global _level
    if _libc is None:
        return None
    resident = resident_bytes()
    if resident is None:
        return None
    if _level is None:
        _level = resident
        return None
    if resident - _level <= margin:
        return None
    return trim()


def trim() -> int | None:
    """``malloc_trim(0)`` now, whatever the process has grown by; the bytes it handed back
    (resident before minus after), or None where the malloc settings are not in effect. What it
    leaves is the level ``release_free_memory`` measures growth from."""
    global _level
    if _libc is None:
        return None
    before = resident_bytes()
    _libc.malloc_trim(0)
    after = _level = resident_bytes()
    return None if before is None or after is None else max(0, before - after)


def peak_resident_bytes() -> int | None:
    """The most resident memory this process has held since it started or since the last
    ``reset_peak_resident`` (Linux ``VmHWM``), or None elsewhere."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


_earlier_peak = 0  # the largest peak before the last reset_peak_resident


def process_peak_bytes() -> int | None:
    """The most resident memory this process has held since it started, across the resets of
    ``reset_peak_resident`` (which the kernel's own figure does not survive)."""
    peak = peak_resident_bytes()
    return None if peak is None else max(peak, _earlier_peak)


def reset_peak_resident() -> bool:
    """Start a new peak at the current resident size (Linux 4.0+: ``5`` to
    ``/proc/self/clear_refs``); False where that cannot be done, and then
    ``peak_resident_bytes`` keeps counting from the process's start. The kernel's own record
    of the process's peak goes with it: ``getrusage``'s ``ru_maxrss`` (and so ``/usr/bin/time``
    on a ``maml train``) then covers only what followed the last reset; ``process_peak_bytes``
    keeps the process's whole peak (a training logs it as ``memory_peak_process_mb``)."""
    global _earlier_peak
    _earlier_peak = process_peak_bytes() or 0
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_since_reset_mb(reset: bool) -> float | None:
    """The peak in MiB since a ``reset_peak_resident`` that returned ``reset``; None when that
    reset could not be made (the figure would be the process's, not the window's)."""
    peak = peak_resident_bytes() if reset else None
    return None if peak is None else peak / MIB
