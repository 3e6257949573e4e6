"""Training on CUDA against the CPU: the same config and seed on both devices.

    python bench/device.py                                   # the three default cases
    python bench/device.py --case halfcheetah-vel --iterations 5

Needs a machine where torch sees a CUDA device (``--devices cpu`` runs the CPU half alone).
For each case (a config of ``configs/`` with a few overrides) and each device it runs
``--warmup`` meta-iterations, then ``--iterations`` timed ones, evaluates the result on a few
held-out tasks after one adaptation step, saves a checkpoint and restores it into a learner on
the other device. It reports:

* seconds per meta-iteration (median) and its phases, per device, and CUDA's ratio to the CPU;
* the first meta-iteration's pre-adaptation return (or MSE) on both devices: the same initial
  parameters, tasks and action noise, so they must agree to float rounding (checked);
* the last iteration's post-adaptation figure and the held-out one, per device: learning on
  CUDA should be like learning on the CPU (they drift apart by rounding, so not checked);
* whether the checkpoint restored on the other device holds the same parameters, bit for bit
  (checked).

Progress goes to stderr; the last line of stdout is JSON. Exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from maml_core.config import load_config
from maml_core.trainer import MetaLearner, summary_table

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    # The paper's navigation2d protocol: 20 tasks x 20 episodes x 100 steps, TRPO.
    "navigation2d": ("configs/navigation2d.yaml", []),
    # Supervised: 25 sinusoids of K = 10 per step, Adam.
    "sinusoid": ("configs/sinusoid.yaml", []),
    # The paper's cheetah protocol: 40 tasks x 10 episodes x 200 steps at 0.01 s, TRPO.
    "halfcheetah-vel": ("configs/halfcheetah-vel.yaml", []),
}
PHASES = ("seconds_iteration", "seconds_sampling", "seconds_adaptation", "seconds_meta_update")
AGREE = 1e-3  # relative: first pre-adaptation figure, CPU against CUDA


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def first_metric(stats: dict) -> tuple[str, str]:
    return ("pre_return", "post_return") if "pre_return" in stats else ("pre_mse", "post_mse")


def run_case(name: str, device: str, args) -> dict:
    path, extra = CASES[name]
    config = load_config(ROOT / path, [f"device={device}", *extra])
    learner = MetaLearner(config)
    try:
        records = []
        total = args.warmup + args.iterations
        for i in range(total):
            stats = learner.step().stats
            records.append(stats)
            pre, post = first_metric(stats)
            log(f"[{name} {device}] {i + 1}/{total}: {stats['seconds_iteration']:.3f} s, "
                f"{pre} {stats[pre]:.4f}, {post} {stats[post]:.4f}")
        timed = records[args.warmup:]
        start = time.perf_counter()
        summary = summary_table(learner.evaluate(learner.held_out_tasks().head(args.eval_tasks),
                                                 1))
        eval_seconds = time.perf_counter() - start
        value = "mean_return" if "mean_return" in summary.columns else "mean_mse"
        held_out = float(summary.loc[summary["step"] == 1, value].iloc[0])
        with tempfile.TemporaryDirectory() as tmp:
            saved = learner.save(tmp)
            other = "cpu" if device == "cuda" else "cuda"
            restored_same = None
            if other in args.devices:
                twin = MetaLearner(load_config(ROOT / path, [f"device={other}", *extra]))
                try:
                    twin.restore(saved)
                    restored_same = all(
                        torch.equal(twin.meta_params[k].detach().cpu(), v.detach().cpu())
                        for k, v in learner.meta_params.items())
                finally:
                    twin.close()
        pre, post = first_metric(records[0])
        return {
            "case": name, "device": device,
            "device_name": (torch.cuda.get_device_name() if device == "cuda"
                            else f"{torch.get_num_threads()} CPU threads"),
            **{k: statistics.median(r.get(k, float("nan")) for r in timed) for k in PHASES},
            "first_" + pre: records[0][pre],
            "last_" + post: records[-1][post],
            "held_out_after_1_step": held_out,
            "held_out_metric": value,
            "eval_seconds": eval_seconds,
            "restored_on_other_device_equal": restored_same,
        }
    finally:
        learner.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", action="append", choices=sorted(CASES),
                   help="repeatable; default: all")
    p.add_argument("--devices", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iterations", type=int, default=3, help="timed meta-iterations")
    p.add_argument("--eval-tasks", type=int, default=10, help="held-out tasks evaluated")
    args = p.parse_args(argv)
    if args.iterations < 1 or args.warmup < 0 or args.eval_tasks < 1:
        p.error("--iterations and --eval-tasks must be >= 1 and --warmup >= 0")
    if "cuda" in args.devices and not torch.cuda.is_available():
        p.error("torch sees no CUDA device here; run on a GPU machine or pass --devices cpu")
    results, failures = [], []
    for name in args.case or list(CASES):
        rows = {d: run_case(name, d, args) for d in args.devices}
        results.extend(rows.values())
        for row in rows.values():
            if row["restored_on_other_device_equal"] is False:
                failures.append(f"{name}: a checkpoint saved on {row['device']} restored to "
                                "other parameters on the other device")
        if len(rows) == 2:
            key = next(k for k in rows["cpu"] if k.startswith("first_"))
            a, b = rows["cpu"][key], rows["cuda"][key]
            gap = abs(a - b) / max(abs(a), 1e-12)
            rows["cuda"]["first_relative_gap_to_cpu"] = gap
            rows["cuda"]["speedup_over_cpu"] = (rows["cpu"]["seconds_iteration"]
                                                / rows["cuda"]["seconds_iteration"])
            if gap > AGREE:
                failures.append(f"{name}: {key} {b} on cuda against {a} on cpu (relative gap "
                                f"{gap:.2e} > {AGREE:g}); the devices do not start alike")
    print(f"{'case':16} {'device':6} {'s/it':>8} {'sampling':>9} {'adapt':>7} {'meta':>7} "
          f"{'first pre':>11} {'last post':>11} {'held-out':>9}  restored")
    for r in results:
        first = next(v for k, v in r.items() if k.startswith("first_") and "gap" not in k)
        last = next(v for k, v in r.items() if k.startswith("last_"))
        print(f"{r['case']:16} {r['device']:6} {r['seconds_iteration']:8.3f} "
              f"{r['seconds_sampling']:9.3f} {r['seconds_adaptation']:7.3f} "
              f"{r['seconds_meta_update']:7.3f} {first:11.4f} {last:11.4f} "
              f"{r['held_out_after_1_step']:9.3f}  {r['restored_on_other_device_equal']}")
    for failure in failures:
        print("FAILED:", failure)
    print(json.dumps({"torch": torch.__version__, "results": results, "failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
