"""The ``baseline`` flow: the paper's baselines, made with our code and evaluated like MAML.

``method`` is one of

* ``random``: a freshly initialized policy (``maml_core.baselines.random_params``), adapted;
* ``pretrained``: one policy trained on all tasks jointly (``pretrained_params``; a Prefect task
  with a progress bar, per-iteration ``pretrain_return``/``pretrain_mse`` in MLflow), adapted;
* ``oracle`` (navigation2d only): the controller that sees the goal (``oracle_curve``). It
  does not adapt, so its curve holds the same return at every step.

Evaluation is MAML's (``MetaLearner.evaluate``): the config's held-out tasks
(``task.test_tasks``, else a seeded draw of ``evaluation.num_tasks``), ``evaluation.steps``
policy-gradient steps (alpha, then alpha / 2) on ``evaluation.episodes_per_task`` episodes,
seeds from ``evaluation.seed`` -- the same tasks and episodes' seeds a meta-train run of that
config is evaluated on.

One MLflow run per call, named ``baseline-{method}-{family}``, tagged ``maml.kind=baseline``,
``maml.method`` and ``maml.task_family``. Params: the resolved config plus
``baseline.method``, ``baseline.pretrain_iterations`` and ``baseline.pretrain_lr``. Metrics:
``eval_return_step_K`` (or ``eval_mse_step_K``), ``train_seconds`` (pretraining's wall time,
0 for random/oracle), ``env_steps`` (RL: the environment steps pretraining took, in total; 0
for random/oracle; supervised families have none); while pretraining, per iteration,
``pretrain_return`` or ``pretrain_mse`` and ``seconds_iteration``. Artifacts as a meta-train
run's evaluation: ``evaluation/per_task.csv``, ``evaluation/summary.csv``,
``plots/adaptation_curve.png``, plus ``config.yaml``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pandas as pd
from prefect import flow, runtime
from prefect.utilities.annotations import quote
from tqdm.auto import tqdm

from flows import plots, tracking
from flows.config import RunConfig, load_run_config
from flows.errors import UsageError
from flows.settings import deprioritize_local_server
from flows.stages import stage_options, stage_task
from flows.training import MetricBuffer, record_failure
from flows.writer import BackgroundWriter
from maml_core import baselines
from maml_core.policies import Params
from maml_core.trainer import MetaLearner, summary_table

METHODS = ("random", "pretrained", "oracle")
PRETRAIN_LR = 1e-2


def check_baseline_inputs(config_path: str | None, method: str,
                          overrides: list[str] | None = None,
                          pretrain_iterations: int | None = None,
                          config_data: dict | None = None) -> RunConfig:
    """The validated config, or an error naming what is wrong and the fix: an unknown method,
    the oracle on a family other than navigation2d, a bad ``--pretrain-iterations``."""
    if method not in METHODS:
        raise UsageError(f"unknown baseline method {method!r}; choose one of "
                         f"{', '.join(METHODS)}")
    if config_data is None:
        if not config_path:
            raise UsageError("give a config file, e.g. configs/navigation2d.yaml")
        if not Path(config_path).is_file():
            raise UsageError(f"config file {config_path!r} does not exist")
    config = load_run_config(config_path, overrides, data=config_data)
    family = config.task.family
    if method == "oracle" and family not in baselines.ORACLE_FAMILIES:
        raise UsageError(f"--method oracle needs a task family that exposes its goal "
                         f"({', '.join(baselines.ORACLE_FAMILIES)}); config has task family "
                         f"{family!r}: use --method random or pretrained for it")
    if pretrain_iterations is not None:
        if method != "pretrained":
            raise UsageError(f"--pretrain-iterations applies to --method pretrained only, not "
                             f"to {method}")
        if (isinstance(pretrain_iterations, bool) or not isinstance(pretrain_iterations, int)
                or pretrain_iterations < 1):
            raise UsageError(f"--pretrain-iterations must be an integer >= 1, got "
                             f"{pretrain_iterations!r}")
    return config


def _pretrain(learner: MetaLearner, iterations: int, lr: float, run_id: str,
              progress: bool) -> tuple[Params, dict[str, float]]:
    """One policy trained on all tasks jointly; per-iteration metrics go to MLflow in batches
    (``flows.training.MetricBuffer``) on a background thread."""
    config = learner.config
    writer = BackgroundWriter("maml-mlflow", retry_seconds=config.pipeline.mlflow_outage_seconds,
                              service="the MLflow tracking server")
    buffer = MetricBuffer(run_id, writer)
    bar = tqdm(total=iterations, disable=not progress, file=sys.stderr, unit="it",
               desc=f"pretrain {config.task.family}", dynamic_ncols=True)
    totals = {"env_steps": 0.0}
    last = [time.perf_counter()]

    def record(it: int, stats: dict[str, float]) -> None:
        now = time.perf_counter()
        totals["env_steps"] += stats.pop("env_steps", 0.0)
        buffer.add(it, {**stats, "seconds_iteration": now - last[0]})
        buffer.flush_if_due()
        last[0] = now
        bar.set_postfix({k.removeprefix("pretrain_"): f"{v:.3g}" for k, v in stats.items()},
                        refresh=False)
        bar.update(1)

    started = time.perf_counter()
    try:
        params = baselines.pretrained_params(learner, iterations, lr, record)
    finally:
        bar.close()
        try:
            buffer.flush()
        finally:
            writer.close()
    cost = {"train_seconds": time.perf_counter() - started}
    if learner.rl:  # supervised families have no environment to count steps of
        cost.update(totals)
    return params, cost


def _evaluate(learner: MetaLearner, method: str, params: Params | None,
              tasks: pd.DataFrame) -> pd.DataFrame:
    """The per-task adaptation curve with MAML's protocol (the oracle's is flat)."""
    if method == "oracle":
        return baselines.oracle_curve(learner, tasks)
    return learner.evaluate(tasks, meta_params=params)


pretrain = stage_task("pretrain")(_pretrain)
evaluate_baseline = stage_task("evaluate-baseline")(_evaluate)


@flow(name="baseline", persist_result=False, log_prints=False)
def baseline(config_path: str | None = None, method: str = "random",
             overrides: list[str] | None = None, pretrain_iterations: int | None = None,
             config_data: dict | None = None, run_name: str | None = None,
             progress: bool | None = None) -> dict:
    """Make the ``method`` baseline for a config and evaluate it like MAML; returns the run id,
    the summary (mean and 95% CI per step), ``train_seconds`` and ``env_steps``."""
    config = check_baseline_inputs(config_path, method, overrides, pretrain_iterations,
                                   config_data)
    deprioritize_local_server()
    family = config.task.family
    iterations = (pretrain_iterations or config.iterations) if method == "pretrained" else 0
    if progress is None:
        progress = not os.environ.get("MAML_NO_PROGRESS")
    learner = MetaLearner(config)
    try:
        held_out = learner.held_out_tasks()
        tcfg = tracking.load_tracking_config()
        tcfg.setup()
        run_id = tracking.start_run(tcfg, run_name or f"baseline-{method}-{family}",
                                    {"maml.kind": "baseline", "maml.method": method,
                                     "maml.task_family": family},
                                    flow_run_id=str(runtime.flow_run.id or "") or None)
        try:
            result = _run(run_id, learner, config, method, iterations, held_out, progress)
        except BaseException as exc:
            record_failure(run_id, exc)
            raise
        tracking.end_run(run_id)
    finally:
        learner.close()
    return result


def _run(run_id: str, learner: MetaLearner, config: RunConfig, method: str, iterations: int,
         held_out: pd.DataFrame, progress: bool) -> dict:
    family = config.task.family
    resolved = config.model_dump(mode="json")
    tracking.log_params(run_id, {**resolved, "baseline": {
        "method": method, "pretrain_iterations": iterations,
        "pretrain_lr": PRETRAIN_LR if method == "pretrained" else None}})
    tracking.log_config_artifact(run_id, resolved)
    tracking.log_dataset(run_id, held_out, name=f"{family}-held-out",
                         source=config.task.test_tasks or "seeded draw", context="evaluation")
    options = stage_options(config, "evaluate")
    cost = {"train_seconds": 0.0, **({"env_steps": 0.0} if learner.rl else {})}
    params: Params | None = None
    if method == "random":
        params = baselines.random_params(learner, seed=config.seed)
    elif method == "pretrained":
        params, cost = pretrain.with_options(**{**options, "timeout_seconds": None})(
            quote(learner), iterations, PRETRAIN_LR, run_id, progress)
    curve = evaluate_baseline.with_options(**options)(quote(learner), method, quote(params),
                                                      quote(held_out))
    summary = summary_table(curve)
    tracking.log_metrics(run_id, {**tracking.eval_metrics(summary), **cost}, 0)
    label = f"ours: {method}"
    title = f"{method} baseline on held-out: {family}"
    if method == "oracle":
        title += " (no adaptation: flat)"
    tracking.log_evaluation(run_id, curve, summary,
                            plots.adaptation_curve(summary, family, title, label=label))
    return {"run_id": run_id, "method": method, "family": family,
            "pretrain_iterations": iterations, "summary": summary.to_dict(orient="records"),
            "curve": curve, **cost}
