"""Time to quality: meta-train navigation2d until the held-out post-adaptation return reaches a
target, and report the wall seconds and meta-iterations it took.

    python bench/time_to_quality.py --config configs/navigation2d-fast.yaml
    python bench/time_to_quality.py --config configs/navigation2d-paper.yaml

``MetaLearner.step`` (maml_core, the work of the pipeline's stages without Prefect or MLflow)
runs one meta-iteration at a time; every ``--eval-every`` iterations the policy is evaluated
with the paper's protocol on the config's frozen held-out tasks (``evaluation`` section: the
tasks, episodes per task, seed): the mean return after one adaptation step. Training stops at
the first evaluation that reaches ``--target`` (default -15) or after ``--max-iterations``.

``seconds_to_target`` is the training wall time (meta-iterations only); the evaluations are the
measurement, not the training, and their time is reported apart (``evaluation_seconds``).
Progress goes to stderr; the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from flows.config import load_run_config
from maml_core.allocator import tune_allocator
from maml_core.trainer import MetaLearner, summary_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/navigation2d-fast.yaml")
    ap.add_argument("--target", type=float, default=-15.0,
                    help="held-out mean return after one adaptation step to reach")
    ap.add_argument("--eval-every", type=int, default=5, help="meta-iterations between checks")
    ap.add_argument("--max-iterations", type=int, default=500)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override (repeatable)")
    args = ap.parse_args()
    if args.eval_every < 1 or args.max_iterations < 1:
        ap.error("--eval-every and --max-iterations must be >= 1")
    tune_allocator()
    config = load_run_config(args.config, args.set)
    if config.task.family != "navigation2d":
        ap.error(f"--config must be a navigation2d config, got {config.task.family!r}")
    learner = MetaLearner(config)
    held_out = learner.held_out_tasks()
    train_seconds = eval_seconds = 0.0
    reached = None
    history = []
    while learner.iteration < args.max_iterations:
        start = time.perf_counter()
        learner.step()
        train_seconds += time.perf_counter() - start
        if learner.iteration % args.eval_every and learner.iteration < args.max_iterations:
            continue
        start = time.perf_counter()
        summary = summary_table(learner.evaluate(held_out, 1))
        eval_seconds += time.perf_counter() - start
        post = float(summary.loc[summary["step"] == 1, "mean_return"].iloc[0])
        history.append({"iteration": learner.iteration, "seconds": train_seconds,
                        "post_adaptation_return": post})
        print(f"iteration {learner.iteration:4d}  training {train_seconds:7.1f} s  "
              f"held-out return after 1 step {post:8.2f}", file=sys.stderr, flush=True)
        if post >= args.target:
            reached = history[-1]
            break
    learner.close()
    if reached:
        print(f"reached {args.target} after {reached['iteration']} meta-iterations, "
              f"{reached['seconds']:.1f} s of training ({eval_seconds:.1f} s of evaluation "
              "apart)")
    else:
        print(f"did not reach {args.target} within {args.max_iterations} meta-iterations "
              f"({train_seconds:.1f} s of training)")
    print(json.dumps({
        "seconds_to_target": reached["seconds"] if reached else None,
        "iterations_to_target": reached["iteration"] if reached else None,
        "target": args.target, "reached": reached is not None,
        "config": args.config, "overrides": args.set,
        "meta_optimizer": config.meta_optimizer.name,
        "evaluation_seconds": eval_seconds, "eval_every": args.eval_every,
        "torch_threads": torch.get_num_threads(), "history": history}))


if __name__ == "__main__":
    main()
