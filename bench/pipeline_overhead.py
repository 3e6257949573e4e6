"""Pipeline overhead: the same navigation2d meta-iterations through the Prefect flow (stage
store writes, MLflow logging) and through maml_core directly, in one process.

    python bench/pipeline_overhead.py [--iterations 10] [--repeats 3] [--optimizer adam]

Prints both medians and their ratio; the last line is one JSON object. The flow's figure is the
wall time of each loop iteration (all stages as Prefect tasks, their store writes, the MLflow
metric batch, store pruning); one-time work (server start, run creation, final evaluation and
model registration) is outside it. Evaluation and checkpoints are off in both runs so that the
same work is compared.

``--breakdown`` also runs the flow twice more per repeat, for diagnosis only: with the stage
tasks called as plain functions (no Prefect task runs), and in addition with the stage-store
writes skipped. The differences split the overhead into Prefect task runs, stage-store writes
and the rest (MLflow metric batches, the loop's own bookkeeping).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from unittest import mock

BENCH = {"seed": 0, "iterations": 10, "meta_batch_size": 20, "episodes_per_task": 20,
         "task": {"family": "navigation2d", "horizon": 100},
         "policy": {"hidden_sizes": [64, 64], "activation": "tanh"},
         "inner": {"step_size": 0.1, "num_steps": 1},
         "meta_optimizer": {"name": "adam", "lr": 0.01},
         "evaluation": {"every": 0}, "checkpoint_every": 1000,
         "pipeline": {"register_model": False}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--optimizer", default="adam", choices=["adam", "sgd", "trpo", "promp"])
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the flow without Prefect task runs and without store writes")
    args = ap.parse_args()
    os.environ.setdefault("MAML_HOME", tempfile.mkdtemp(prefix="maml-bench-"))
    os.environ["MAML_NO_PROGRESS"] = "1"
    from flows.settings import configure_environment

    configure_environment()
    import torch

    from flows.config import load_run_config
    from flows.training import meta_train
    from maml_core.trainer import MetaLearner

    data = {**BENCH, "iterations": args.iterations,
            "meta_optimizer": {**BENCH["meta_optimizer"], "name": args.optimizer}}
    variants = ["flow"] + (["plain-stages", "plain-stages-no-store"] if args.breakdown else [])
    core_times: list[float] = []
    times: dict[str, list[float]] = {v: [] for v in variants}
    warm = MetaLearner(load_run_config(data=data))
    warm.train(2)  # warm-up of torch's kernels
    for r in range(args.repeats):
        learner = MetaLearner(load_run_config(data=data))
        for _ in range(args.iterations):
            t = time.perf_counter()
            learner.step()
            core_times.append(time.perf_counter() - t)
        for variant in variants:
            with _patched(variant):
                result = meta_train(config_data=data, run_name=f"overhead-bench-{r}")
            times[variant].extend(result["iteration_seconds"])
            same = all(torch.equal(learner.meta_params[k].detach(), v)
                       for k, v in _final(result).items())
            print(f"repeat {r + 1}/{args.repeats}: core {statistics.median(core_times):.3f} "
                  f"s/it, {variant} {statistics.median(times[variant]):.3f} s/it, same "
                  f"parameters: {same}", file=sys.stderr)
    core = statistics.median(core_times)
    flow = statistics.median(times["flow"])
    print(f"maml_core directly : {core:.4f} s per meta-iteration (median of {len(core_times)})")
    print(f"Prefect flow       : {flow:.4f} s per meta-iteration (median of {len(times['flow'])})")
    print(f"overhead ratio     : {flow / core:.3f}")
    figures = {"core_seconds_per_iteration": core, "flow_seconds_per_iteration": flow,
               "overhead_ratio": flow / core, "iterations": args.iterations,
               "repeats": args.repeats, "optimizer": args.optimizer,
               "torch_threads": torch.get_num_threads()}
    if args.breakdown:
        plain = statistics.median(times["plain-stages"])
        bare = statistics.median(times["plain-stages-no-store"])
        parts = {"prefect_task_runs": flow - plain, "stage_store_writes": plain - bare,
                 "rest": bare - core}
        for name, seconds in parts.items():
            print(f"  {name:<19}: {1000 * seconds:+.1f} ms per meta-iteration")
        figures["breakdown_seconds_per_iteration"] = parts
    print(json.dumps(figures))


@contextlib.contextmanager
def _patched(variant: str):
    """For ``--breakdown`` only: the flow with parts of its work taken out."""
    from flows.stages import ConfiguredStage
    from flows.store import StageStore

    with contextlib.ExitStack() as stack:
        if variant != "flow":
            stack.enter_context(mock.patch.object(
                ConfiguredStage, "__call__", lambda self, *args: self.task.fn(*args)))
        if variant == "plain-stages-no-store":
            stack.enter_context(mock.patch.object(
                StageStore, "_write", lambda self, fn, *args: None))
        yield


def _final(result: dict):
    from maml_core.checkpoint import load_checkpoint

    _, params, _ = load_checkpoint(os.path.join(result["store"], "checkpoints"))
    return params


if __name__ == "__main__":
    main()
