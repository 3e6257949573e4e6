"""What handing freed memory back to the OS costs a meta-iteration (``release_free_memory``).

    python bench/memory_release.py                        # halfcheetah-dir-fast, 20 x 20 x 200
    python bench/memory_release.py --config configs/navigation2d.yaml --pairs 8

``MetaLearner.meta_update`` calls ``malloc_trim`` when the process has grown 512 MiB since its
last release; the memory handed back is page-faulted in again by the iterations that reuse it.
After a warm-up this runs the config's meta-iterations in pairs of two arms, two iterations
each: in one arm the first iteration ends with ``malloc_trim(0)``, in the other with none, and
the second iteration is timed and its minor page faults counted (``getrusage``). Pairs
alternate which arm comes first, so a drift of the machine's speed cancels; the figures are
medians over the pairs: the trim call itself, the memory it handed back, and the following
iteration's extra page faults and seconds against the one after no trim (the arms run
different tasks, so a single pair is noisy). RL configs only (a supervised config has no
meta-update release). Progress goes to stderr; the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maml_core import allocator, trainer
from maml_core.config import load_config
from maml_core.trainer import MetaLearner

MIB = allocator.MIB


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/halfcheetah-dir-fast.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (repeatable)")
    p.add_argument("--warmup", type=int, default=2, help="meta-iterations before the pairs")
    p.add_argument("--pairs", type=int, default=6)
    args = p.parse_args(argv)
    if args.pairs < 1 or args.warmup < 1:
        p.error("--pairs and --warmup must be >= 1")
    if not allocator.tune_allocator() or allocator.resident_bytes() is None:
        log("glibc's malloc settings are not in effect here (not Linux/glibc, "
            "MAML_MALLOC_TUNING=0, or MALLOC_* set): nothing to measure")
        return 2

    config = load_config(args.config, args.set)
    learner = MetaLearner(config)
    if not learner.rl:
        learner.close()
        p.error(f"{args.config} is a supervised config: only RL meta-updates release memory")
    try:
        return _measure(args, learner)
    finally:
        learner.close()


def _measure(args: argparse.Namespace, learner: MetaLearner) -> int:
    trim = {"next": False}
    trim_seconds: list[float] = []
    released_mb: list[float] = []

    def release(margin: int = allocator.TRIM_THRESHOLD) -> int | None:
        """The meta-update's release, as this bench decides: a trim or none."""
        if not trim["next"]:
            return None
        t = time.perf_counter()
        released = allocator.trim()
        trim_seconds.append(time.perf_counter() - t)
        released_mb.append(released / MIB)
        return released

    trainer.release_free_memory = release  # this process only: the bench's release policy

    def iteration(trim_after: bool) -> tuple[float, int]:
        trim["next"] = trim_after
        faults, t = minor_faults(), time.perf_counter()
        learner.step()
        return time.perf_counter() - t, minor_faults() - faults

    log(f"{args.config}: {args.warmup} warm-up iterations, then {args.pairs} pairs")
    for _ in range(args.warmup):
        iteration(False)
    after = {True: [], False: []}  # the iteration after one that trimmed / did not
    for pair in range(args.pairs):
        order = (True, False) if pair % 2 == 0 else (False, True)
        for trimmed in order:
            iteration(trimmed)  # ends with a trim or not
            after[trimmed].append(iteration(False))
        (s1, f1), (s0, f0) = after[True][-1], after[False][-1]
        log(f"pair {pair + 1}: after a trim of {released_mb[-1]:.0f} MB {s1:.2f} s, "
            f"{f1} faults; after none {s0:.2f} s, {f0} faults")

    ratios = [a[0] / b[0] for a, b in zip(after[True], after[False], strict=True)]
    extra_faults = [a[1] - b[1] for a, b in zip(after[True], after[False], strict=True)]
    extra_seconds = [a[0] - b[0] for a, b in zip(after[True], after[False], strict=True)]
    result = {
        "config": args.config, "overrides": args.set, "pairs": args.pairs,
        "machine": platform.processor() or platform.machine(),
        "median_trim_seconds": statistics.median(trim_seconds),
        "median_released_mb": statistics.median(released_mb),
        "median_seconds_after_trim": statistics.median(s for s, _ in after[True]),
        "median_seconds_after_none": statistics.median(s for s, _ in after[False]),
        "median_ratio_after_trim": statistics.median(ratios),
        "median_extra_seconds": statistics.median(extra_seconds),
        "median_extra_minor_faults": statistics.median(extra_faults),
    }
    print(f"trim: {result['median_trim_seconds'] * 1e3:.1f} ms, "
          f"{result['median_released_mb']:.0f} MB handed back; the next iteration "
          f"{result['median_seconds_after_trim']:.2f} s against "
          f"{result['median_seconds_after_none']:.2f} s after none "
          f"(x{result['median_ratio_after_trim']:.3f}, "
          f"{result['median_extra_seconds']:+.2f} s, "
          f"{result['median_extra_minor_faults']:+.0f} minor page faults)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
