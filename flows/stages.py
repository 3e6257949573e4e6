"""One Prefect task per stage. Each is a thin wrapper around one ``MetaLearner`` method.

A stage reads its inputs as arguments (in one process) or from the stage store (``maml stage``),
writes its outputs to the store, and returns them. Stages are deterministic functions of their
inputs -- seeds derive from (run seed, iteration, stage, task id) -- so a retry, or a re-run
from the store, gives identical outputs. Failures that cannot heal (a bad config, a checkpoint
that does not fit, repeated rejected updates) are not retried.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff
from prefect.utilities.annotations import quote
from torch import Tensor

from flows.config import RunConfig
from flows.store import StageStore, StoreError
from maml_core.checkpoint import CheckpointError
from maml_core.config import ConfigError
from maml_core.episodes import Episodes
from maml_core.faults import fault_point
from maml_core.policies import Params
from maml_core.tasksets import TaskSetError
from maml_core.trainer import MetaLearner, TrainingError

NON_RETRYABLE = (ConfigError, CheckpointError, TaskSetError, TrainingError, StoreError)
OPTIM_PREFIX = "optim/"


class InjectedFault(RuntimeError):
    """A fault injected on purpose (``MAML_INJECT_FAULT``) to exercise retries."""


_fired: set[str] = set()


def maybe_inject_fault(stage: str, iteration: int) -> None:
    """Fail once at ``stage@iteration`` when ``MAML_INJECT_FAULT`` names it (comma-separated)."""
    wanted = os.environ.get("MAML_INJECT_FAULT", "")
    key = f"{stage}@{iteration}"
    if key in {w.strip() for w in wanted.split(",")} and key not in _fired:
        _fired.add(key)
        raise InjectedFault(f"injected fault in stage {stage} at iteration {iteration}")


def retry_condition(task_obj, task_run, state) -> bool:
    """Retry anything but errors that a retry cannot heal."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # result not available: treat as transient
        return True
    return not isinstance(exc, NON_RETRYABLE)


@dataclass
class PipelineContext:
    """What every stage of a run shares (in-process only; never serialized)."""

    learner: MetaLearner
    store: StageStore
    config: RunConfig
    timings: dict[str, float] = field(default_factory=dict)
    # mean return and env steps of the last collect_rollouts of each phase (pre, post)
    collected: dict[str, dict] = field(default_factory=dict)
    # The state dict the learner holds right now (None once it may have changed), so that an
    # in-process meta_update need not reload what the learner already has.
    loaded_state: dict | None = None
    loaded_record: dict | None = None
    # ``pipeline.task_runner: dask``: a flows.scale_out.DaskCollector that collects rollouts
    # in shards of tasks on a Dask cluster (same signature and numbers as learner.collect).
    scale_out: Any = None

    def timed(self, name: str, start: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def learner_state(learner: MetaLearner) -> tuple[dict[str, Tensor], dict]:
    """Meta-parameters and optimizer state as one flat dict of tensors (+ JSON-able extras)."""
    tensors, meta = learner.optimizer.state_dict()
    out = {k: v.detach().clone() for k, v in learner.meta_params.items()}
    out.update({OPTIM_PREFIX + k: v for k, v in tensors.items()})
    return out, {"optimizer": meta, "rejected_in_a_row": learner.rejected_in_a_row}


def load_learner_state(learner: MetaLearner, tensors: dict[str, Tensor], record: dict) -> None:
    params = {k: v for k, v in tensors.items() if not k.startswith(OPTIM_PREFIX)}
    optim = {k[len(OPTIM_PREFIX):]: v.to(learner.device) for k, v in tensors.items()
             if k.startswith(OPTIM_PREFIX)}
    learner.load_params(params, "stored meta-parameters")
    learner.optimizer.load_state_dict(optim, record.get("optimizer", {}))
    learner.rejected_in_a_row = int(record.get("rejected_in_a_row", 0))


def stage_task(name: str):
    """The decorator of a pipeline task: no cache, no persisted result, and no retry of what a
    retry cannot heal (``retry_condition``); retries and timeouts come from ``stage_options``."""
    return task(name=name, cache_policy=NO_CACHE, persist_result=False,
                retry_condition_fn=retry_condition)


def stage_options(config: RunConfig, stage: str) -> dict:
    p = config.pipeline
    return {"retries": p.retries,
            "retry_delay_seconds": exponential_backoff(p.retry_delay_seconds)
            if p.retries else 0,
            "retry_jitter_factor": p.retry_jitter_factor,
            "timeout_seconds": getattr(p.timeouts, stage)}


# --------------------------------------------------------------------------- stage bodies
# Plain functions (usable without Prefect); the tasks below wrap them.

def run_sample_tasks(ctx: PipelineContext, iteration: int) -> pd.DataFrame:
    maybe_inject_fault("sample_tasks", iteration)
    fault_point(f"stage:sample_tasks:{iteration}:start")
    start = time.perf_counter()
    tasks = ctx.learner.sample_tasks(iteration)
    ctx.store.save_table(iteration, "tasks", tasks)
    ctx.timed("sample_tasks", start)
    fault_point(f"stage:sample_tasks:{iteration}:end")
    return tasks


def run_collect_rollouts(ctx: PipelineContext, iteration: int, phase: str, params: Params,
                         tasks: pd.DataFrame) -> Episodes:
    maybe_inject_fault("collect_rollouts", iteration)
    fault_point(f"stage:collect_rollouts:{iteration}:start")
    start = time.perf_counter()
    episodes = (ctx.scale_out or ctx.learner).collect(params, tasks, iteration, phase)
    summary = {"mean_return": float(episodes.task_returns().mean()),
               "env_steps": episodes.num_steps}
    ctx.collected[phase] = summary
    ctx.store.save_episodes(iteration, phase, episodes, summary)
    ctx.timed(f"collect_{phase}", start)
    fault_point(f"stage:collect_rollouts:{iteration}:end")
    return episodes


def adapted_name(step: int) -> str:
    """The stage-store name of the parameters adapted by inner step ``step`` (0-based):
    ``adapted``, then ``adapted1``, ``adapted2``, ... for inner steps on fresh episodes."""
    return "adapted" if step == 0 else f"adapted{step}"


def run_adapt(ctx: PipelineContext, iteration: int, theta: dict[str, Tensor],
              episodes: Episodes, step: int = 0, phi: Params | None = None) -> Params:
    """Inner adaptation on ``episodes``: from theta (``step`` 0: every inner step, or the first
    one with fresh episodes), or, for a later step on fresh episodes, one step from ``phi``."""
    maybe_inject_fault("adapt", iteration)
    fault_point(f"stage:adapt:{iteration}:start")
    start = time.perf_counter()
    params = {k: v for k, v in theta.items() if not k.startswith(OPTIM_PREFIX)}
    if step == 0:
        adapted = ctx.learner.adapt(episodes, params)
    else:
        adapted = ctx.learner.adapt_further(episodes, phi, step, params)
    ctx.store.save_tensors(iteration, adapted_name(step), adapted)
    ctx.timed("adapt", start)
    fault_point(f"stage:adapt:{iteration}:end")
    return adapted


def run_meta_update(ctx: PipelineContext, iteration: int, theta: dict[str, Tensor],
                    theta_record: dict, pre: Episodes, post: Episodes,
                    later: tuple[Episodes, ...] = ()
                    ) -> tuple[dict[str, Tensor], dict, dict[str, float]]:
    maybe_inject_fault("meta_update", iteration)
    fault_point(f"stage:meta_update:{iteration}:start")
    start = time.perf_counter()
    learner = ctx.learner
    if ctx.loaded_state is not theta:  # a retry or a lone re-run starts from the stored state
        load_learner_state(learner, theta, theta_record)
    ctx.loaded_state = None
    stats = learner.meta_update(pre, post, tuple(later))
    new_state, record = learner_state(learner)
    ctx.loaded_state, ctx.loaded_record = new_state, record
    ctx.store.save_tensors(iteration, "meta_update", new_state, {**record, "stats": stats})
    ctx.timed("meta_update", start)
    fault_point(f"stage:meta_update:{iteration}:end")
    return new_state, record, stats


def run_evaluate(ctx: PipelineContext, iteration: int, tasks: pd.DataFrame,
                 steps: int | None = None, kind: str = "evaluation") -> pd.DataFrame:
    """The adaptation curve of the learner's parameters on ``tasks``: the held-out evaluation
    (``kind`` "evaluation"), or model selection's validation (``kind`` "validation": its own
    episode seed, ``evaluation.select_steps`` steps by default)."""
    maybe_inject_fault("evaluate", iteration)
    fault_point(f"stage:evaluate:{iteration}:start")
    start = time.perf_counter()
    learner = ctx.learner
    if kind == "validation":
        curve = learner.evaluate(tasks, steps or learner.config.evaluation.select_steps,
                                 seed=learner.validation_seed)
    else:
        curve = learner.evaluate(tasks, steps)
    ctx.store.save_evaluation(iteration, curve, kind)
    ctx.timed(kind if kind == "validation" else "evaluate", start)
    fault_point(f"stage:evaluate:{iteration}:end")
    return curve


def run_checkpoint(ctx: PipelineContext, iteration: int, extra: dict | None = None):
    maybe_inject_fault("checkpoint", iteration)
    fault_point(f"stage:checkpoint:{iteration}:start")
    start = time.perf_counter()
    try:
        path = ctx.learner.save(ctx.store.checkpoint_dir, extra)
    except OSError as exc:  # a full or unwritable store: not healed by a retry
        raise ctx.store.write_error(exc) from exc
    ctx.timed("checkpoint", start)
    fault_point(f"stage:checkpoint:{iteration}:end")
    return path


sample_tasks = stage_task("sample_tasks")(run_sample_tasks)
collect_rollouts = stage_task("collect_rollouts")(run_collect_rollouts)
adapt = stage_task("adapt")(run_adapt)
meta_update = stage_task("meta_update")(run_meta_update)
evaluate = stage_task("evaluate")(run_evaluate)
checkpoint = stage_task("checkpoint")(run_checkpoint)

STAGE_TASKS = {"sample_tasks": sample_tasks, "collect_rollouts": collect_rollouts,
               "adapt": adapt, "meta_update": meta_update, "evaluate": evaluate,
               "checkpoint": checkpoint}


class ConfiguredStage:
    """A stage task with a run's options, called with its arguments quoted.

    Stage arguments never hold Prefect futures or states, so Prefect need not walk them: left
    unquoted, each call would traverse the pipeline context (the whole pydantic config), the
    episodes and the parameter dicts three times (inputs, dependency tracking, resolution),
    which was most of Prefect's cost per task run (``bench/pipeline_overhead.py``)."""

    def __init__(self, task_obj):
        self.task = task_obj

    def __call__(self, *args):
        return self.task(*(quote(a) for a in args))


def configured(config: RunConfig) -> dict[str, ConfiguredStage]:
    """The stage tasks with the retries and timeouts of ``config``."""
    return {name: ConfiguredStage(t.with_options(**stage_options(config, name)))
            for name, t in STAGE_TASKS.items()}
