"""The ``meta_train`` flow: the stages for N iterations, evaluation, checkpoints and lineage."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path

import pandas as pd
from prefect import flow, runtime
from prefect.exceptions import TerminationSignal
from tqdm.auto import tqdm

from flows import plots, scale_out, tracking
from flows.config import RunConfig, load_run_config
from flows.errors import one_line
from flows.settings import deprioritize_local_server, maml_home
from flows.stages import PipelineContext, configured, learner_state
from flows.store import StageStore
from flows.writer import BackgroundWriter, ServiceUnavailableError
from maml_core.allocator import MIB, peak_since_reset_mb, process_peak_bytes, reset_peak_resident
from maml_core.checkpoint import latest_checkpoint, load_checkpoint
from maml_core.config import PAPER_LATER_STEP_SCALE, ConfigError
from maml_core.evaluation import selection_score
from maml_core.faults import fault_point
from maml_core.trainer import MetaLearner, summary_table

_LOG = logging.getLogger(__name__)
# How long an interrupted training (Ctrl-C, SIGTERM) waits for MLflow, for its last metrics and
# then for marking its run KILLED, before it lets the process end.
INTERRUPT_GRACE_SECONDS = 10.0
ITERATION_METRICS = ("pre_return", "post_return", "pre_mse", "post_mse", "meta_loss",
                     "meta_loss_after", "kl", "grad_norm", "line_search_steps", "rejected",
                     "rejected_in_a_row", "env_steps", "memory_resident_mb",
                     "memory_released_mb", "memory_trimmed", "memory_peak_mb",
                     # learned step sizes with an optimizer of their own (inner.step_size_lr)
                     "step_size_min", "step_size_mean", "step_size_max",
                     "step_size_grad_norm", "step_size_rejected")


def store_root() -> Path:
    return maml_home() / "store"


def resolve_config(config_path: str | None, overrides: list[str] | None,
                   config_data: dict | None, resume: str | None) -> RunConfig:
    if resume and config_path is None and config_data is None:
        store = StageStore(store_root(), resume)
        if not (store.run_dir / "config.json").is_file():
            raise tracking.TrackingError(
                f"cannot resume run {resume!r}: it has no stored config in "
                f"{str(store.run_dir)!r} (is the run id right? `maml ui` lists the runs)")
        config = load_run_config(data=store.load_config(), overrides=overrides)
        ModelSelection.check_resume(store, config)
        return config
    return load_run_config(config_path, overrides, data=config_data)


class ModelSelection:
    """Model selection (``evaluation.validation_tasks``): the validation score of each model
    validated so far, by iteration, kept in the stage store (``selection.json``) so that a
    resumed run selects among all of them. Every validated model is also checkpointed, so the
    selected one can be loaded back at the end."""

    FILE = "selection.json"

    def __init__(self, store: StageStore, settings: dict, scores: dict[int, float]
                 | None = None):
        self.store, self.settings = store, settings
        self.scores: dict[int, float] = dict(scores or {})

    @property
    def select_steps(self) -> int:
        return self.settings["select_steps"]

    @staticmethod
    def settings_of(config: RunConfig) -> dict:
        """What a score depends on besides the model: the validation set, its episodes and
        the steps scored."""
        ev = config.evaluation
        return {"validation_tasks": ev.validation_tasks, "select_steps": ev.select_steps,
                "seed": ev.seed, "episodes_per_task": ev.episodes_per_task,
                "later_step_scale": ev.later_step_scale}

    @classmethod
    def check_resume(cls, store: StageStore, config: RunConfig) -> None:
        """Refuse a resume whose overrides would score the later models otherwise than the
        earlier ones (their scores could not be compared)."""
        path = store.run_dir / cls.FILE
        if not path.is_file():
            return
        record = store.read_json(path)
        if not record.get("scores"):
            return
        # records made before the settings were kept hold select_steps alone
        before = record.get("settings") or {"select_steps": record.get("select_steps")}
        # and those made before the evaluation's later steps could be scaled used the paper's
        before = {"later_step_scale": PAPER_LATER_STEP_SCALE, **before}
        now = cls.settings_of(config)
        changed = [f"evaluation.{k}: {v} -> {now.get(k)}" for k, v in before.items()
                   if v is not None and now.get(k) != v]
        if changed:
            raise ConfigError(
                f"cannot resume run {store.run_id!r} with {', '.join(changed)}: its models "
                "were scored for model selection with the first values, and scores made "
                "otherwise cannot be compared with them; resume without those --set "
                "overrides, or start a new run")

    @classmethod
    def load(cls, store: StageStore, settings: dict, up_to: int) -> ModelSelection:
        """The scores recorded up to iteration ``up_to`` (the resumed checkpoint's): later
        ones are validated again as the run passes them. ``settings``: this run's
        :meth:`settings_of` (a resume that changes them is refused by :meth:`check_resume`)."""
        path = store.run_dir / cls.FILE
        scores = {}
        if path.is_file():
            scores = {int(k): float(v) for k, v in store.read_json(path).get(
                "scores", {}).items() if int(k) <= up_to}
        return cls(store, settings, scores)

    def add(self, iteration: int, score: float) -> None:
        self.scores[int(iteration)] = float(score)
        self.store.write_json(self.store.run_dir / self.FILE,
                              {"settings": self.settings,
                               "scores": {str(k): v for k, v in sorted(self.scores.items())}})

    def best(self) -> int | None:
        """The iteration of the highest score (the earliest of equal ones; a NaN or infinite
        score, e.g. a diverged MSE, never wins), or None where there is none."""
        finite = [it for it in sorted(self.scores) if math.isfinite(self.scores[it])]
        if not finite:
            return None
        return max(finite, key=lambda it: self.scores[it])

    def table(self) -> pd.DataFrame:
        best = self.best()
        return pd.DataFrame({"iteration": sorted(self.scores),
                             "validation_score": [self.scores[k] for k in sorted(self.scores)],
                             "selected": [k == best for k in sorted(self.scores)]})


class MetricBuffer:
    """Per-iteration metrics, sent to MLflow in one batch every few seconds (and at every
    checkpoint and at the end) instead of one SQL transaction per iteration."""

    def __init__(self, run_id: str, writer: BackgroundWriter, every_seconds: float = 5.0):
        self.run_id, self.writer, self.every = run_id, writer, every_seconds
        self.pending: dict[int, dict[str, float]] = {}
        self.last = time.monotonic()

    def add(self, step: int, metrics: dict[str, float]) -> None:
        self.pending.setdefault(int(step), {}).update(metrics)

    def flush_if_due(self) -> None:
        if time.monotonic() - self.last >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.writer.submit(tracking.log_metric_steps, self.run_id, self.pending)
            self.pending = {}
        self.last = time.monotonic()


@flow(name="meta-train", persist_result=False, log_prints=False)
def meta_train(config_path: str | None = None, overrides: list[str] | None = None,
               resume: str | None = None, config_data: dict | None = None,
               init_model: str | None = None, run_name: str | None = None,
               progress: bool | None = None) -> dict:
    """Meta-train a policy; returns a summary (run id, evaluation, model version)."""
    config = resolve_config(config_path, overrides, config_data, resume)
    deprioritize_local_server()
    tcfg = tracking.load_tracking_config()
    tcfg.setup()
    if resume:
        run_id = tracking.require_run(resume)
    else:
        run_id = tracking.start_run(tcfg, run_name or f"meta-train-{config.task.family}",
                                    {"maml.task_family": config.task.family,
                                     "maml.kind": "meta-train"},
                                    flow_run_id=str(runtime.flow_run.id or "") or None,
                                    parent_model_version=init_model)
    writer = BackgroundWriter()
    # MLflow calls of the loop (metrics, checkpoint artifacts) on their own thread, retried
    # through an outage of the server for up to pipeline.mlflow_outage_seconds (README,
    # "Reliability"); the loop waits for them only before a checkpoint and at the end.
    mlflow_writer = BackgroundWriter(
        "maml-mlflow", retry_seconds=config.pipeline.mlflow_outage_seconds,
        service=f"the MLflow tracking server ({tcfg.tracking_uri})",
        hint=f"the metrics since the last checkpoint are replayed by "
             f"`maml train --resume {run_id}` once it is back")
    metric_buffer = MetricBuffer(run_id, mlflow_writer)
    store = StageStore(store_root(), run_id, writer, sync=config.pipeline.store_sync)
    store.ensure_writable()
    learner = MetaLearner(config)
    if init_model and not resume:  # its lineage: the run's tag, set by start_run
        _, params, _, _ = tracking.load_policy(init_model)
        learner.load_model_params(params, f"model {init_model!r}")
    if resume:
        store.remove_leftovers()  # temporaries of interrupted writes, half-pruned folders
        ckpt = latest_checkpoint(store.checkpoint_dir)
        if ckpt is not None:
            learner.restore(ckpt)
            # its artifact upload may be what the crash interrupted (idempotent)
            mlflow_writer.submit(tracking.log_checkpoint, run_id, ckpt)
        tracking.record_resume(run_id, learner.iteration)
    else:
        store.save_config(config.model_dump(mode="json"))
        tracking.log_params(run_id, config.model_dump(mode="json"))
        tracking.log_config_artifact(run_id, config.model_dump(mode="json"))
    held_out = learner.held_out_tasks()
    validation = learner.validation_tasks()  # None: the last iterate is the model
    selection = ModelSelection.load(store, ModelSelection.settings_of(config), learner.iteration)
    if not resume:
        tracking.log_dataset(run_id, held_out, name=f"{config.task.family}-held-out",
                             source=config.task.test_tasks or "seeded draw",
                             context="evaluation")
        if validation is not None:
            tracking.log_dataset(run_id, validation, name=f"{config.task.family}-validation",
                                 source="seeded draw", context="validation")
    ctx = PipelineContext(learner, store, config)
    stages = configured(config)
    total = config.iterations
    if progress is None:
        progress = not os.environ.get("MAML_NO_PROGRESS")
    bar = tqdm(total=total, initial=learner.iteration, disable=not progress, file=sys.stderr,
               desc=f"meta-train {config.task.family}", unit="it", dynamic_ncols=True)
    curve = None
    wall: list[float] = []  # per iteration, stage store and MLflow logging included
    stopped: BaseException | None = None  # an error, or an interrupt (Ctrl-C, SIGTERM)
    try:
        ctx.scale_out = scale_out.open_collector(config, learner)  # None: local runner
        while learner.iteration < total:
            it = learner.iteration
            started = time.perf_counter()
            ctx.timings.clear()
            peaks = reset_peak_resident()  # memory_peak_mb: this iteration's, stages and all
            if ctx.loaded_state is None:
                ctx.loaded_state, ctx.loaded_record = learner_state(learner)
            state, record = ctx.loaded_state, ctx.loaded_record
            store.save_tensors(it, "theta", state, record)
            if learner.rl:
                stats = _rl_iteration(ctx, stages, it, state, record)
            else:
                stats = learner.step().stats
                ctx.loaded_state = None
            elapsed = time.perf_counter() - started
            stats.update({f"seconds_{k}": v for k, v in ctx.timings.items()})
            stats["seconds_iteration"] = elapsed
            if (peak := peak_since_reset_mb(peaks)) is not None:
                stats["memory_peak_mb"] = peak
            learner.iteration = it + 1
            metric_buffer.add(it, {k: v for k, v in stats.items()
                                   if k in ITERATION_METRICS or k.startswith("seconds_")})
            done = it + 1
            validated = False
            if config.evaluation.every and (done % config.evaluation.every == 0
                                            or done == total):
                peaks = reset_peak_resident()
                curve = stages["evaluate"](ctx, done, held_out)
                metric_buffer.add(done, tracking.eval_metrics(summary_table(curve)))
                if validation is not None:
                    metric_buffer.add(done, _validate(ctx, stages, selection, done, validation))
                    validated = True  # checkpointed below, so that it can be selected
                if (peak := peak_since_reset_mb(peaks)) is not None:
                    metric_buffer.add(done, {"memory_peak_evaluate_mb": peak})
                # Their seconds go with their figures, at step ``done``: outside the iteration's.
                metric_buffer.add(done, {f"seconds_{k}": ctx.timings[k]
                                         for k in ("evaluate", "validation") if k in ctx.timings})
            if done % config.checkpoint_every == 0 or done == total or validated:
                metric_buffer.flush()
                store.sync()
                store.drain()  # everything before the checkpoint is on disk and in MLflow
                mlflow_writer.drain()
                path = stages["checkpoint"](ctx, done)
                mlflow_writer.submit(tracking.log_checkpoint, run_id, path)
            metric_buffer.flush_if_due()
            store.prune(config.pipeline.keep_last)
            fault_point(f"iteration:{it}:end")
            bar.set_postfix(_postfix(stats), refresh=False)
            bar.update(1)
            wall.append(time.perf_counter() - started)
    except BaseException as exc:
        stopped = exc
        raise
    finally:
        failure = stopped if isinstance(stopped, Exception) else None
        bar.close()
        try:
            try:
                if isinstance(failure, ServiceUnavailableError):
                    mlflow_writer.close(abandon=True)  # MLflow is gone: do not wait again
                elif stopped is not None and failure is None:  # Ctrl-C, SIGTERM: brief wait
                    with contextlib.suppress(Exception):  # (the interrupt matters more)
                        metric_buffer.flush()
                    # What MLflow has not taken by then, the resume replays: everything
                    # since the last checkpoint is redone.
                    mlflow_writer.close(grace=INTERRUPT_GRACE_SECONDS)
                else:
                    metric_buffer.flush()
                    mlflow_writer.close()
            finally:
                if failure is None:
                    store.sync()
                writer.close()
        finally:
            if stopped is not None:
                record_stop(run_id, stopped, learner.iteration)
    try:  # the final evaluation and the model: an error or interrupt here is recorded too
        selected = _load_selected(ctx, run_id, selection) if validation is not None else None
        if curve is None or selected not in (None, learner.iteration):
            curve = stages["evaluate"](ctx, learner.iteration if selected is None else selected,
                                       held_out)
        summary = summary_table(curve)
        _log_outputs(run_id, learner, config, curve, summary, held_out, selected)
        if (peak := process_peak_bytes()) is not None:  # setup and the end included
            tracking.log_metrics(run_id, {"memory_peak_process_mb": peak / MIB},
                                 step=learner.iteration)
        version = None
        if config.pipeline.register_model:
            version = tracking.log_policy_model(run_id, learner, tcfg.registered_model_name,
                                                iteration=selected)
        tracking.end_run(run_id)
    except BaseException as exc:
        record_stop(run_id, exc, learner.iteration)
        raise
    learner.close()
    return {"run_id": run_id, "iterations": learner.iteration, "selected_iteration": selected,
            "summary": summary.to_dict(orient="records"),
            "model_version": getattr(version, "version", None),
            "registered_model": tcfg.registered_model_name, "store": str(store.run_dir),
            "iteration_seconds": wall}


def record_stop(run_id: str, exc: BaseException, iteration: int) -> None:
    """Record on the MLflow run why it stopped before its end: an error marks it FAILED
    (``record_failure``), an interrupt (Ctrl-C, a termination signal) KILLED
    (``record_interruption``). The run id rides on the exception, for the resume hint of
    ``maml train``."""
    with contextlib.suppress(AttributeError):
        exc.maml_run_id = run_id
    if isinstance(exc, Exception):
        record_failure(run_id, exc)
    else:
        record_interruption(run_id, iteration)


def record_failure(run_id: str, exc: BaseException) -> None:
    """Mark the MLflow run FAILED with the error as a tag (best effort: not when MLflow itself
    is what failed). ``maml train --resume`` reopens it."""
    if isinstance(exc, ServiceUnavailableError):
        return
    try:
        tracking.set_tags(run_id, {tracking.TAG_FAILURE: f"{type(exc).__name__}: "
                                   f"{' '.join(str(exc).split())}"})
        tracking.end_run(run_id, "FAILED")
    except Exception:  # the original error matters more
        pass


def record_interruption(run_id: str, iteration: int,
                        wait: float = INTERRUPT_GRACE_SECONDS) -> None:
    """Mark the MLflow run KILLED, with where it stopped as a tag, when training is interrupted
    (Ctrl-C, SIGTERM): not left RUNNING for ever. Best effort, and brief: an MLflow server that
    does not answer within ``wait`` seconds (or a second Ctrl-C) is not waited for, as the user
    asked to stop. ``maml train --resume`` reopens the run from its last checkpoint either way."""
    done = threading.Event()
    outcome: list[BaseException | None] = []

    def mark() -> None:
        try:
            tracking.set_tags(run_id, {tracking.TAG_INTERRUPTED: f"interrupted after "
                                       f"{iteration} meta-iterations; resume with "
                                       f"`maml train --resume {run_id}`"})
            tracking.end_run(run_id, "KILLED")
            outcome.append(None)
        except Exception as exc:  # the interrupt matters more: reported below
            outcome.append(exc)
        finally:
            done.set()

    threading.Thread(target=mark, name="maml-record-interruption", daemon=True).start()
    try:
        done.wait(wait)
    except (KeyboardInterrupt, TerminationSignal):  # a second Ctrl-C or SIGTERM: stop waiting
        pass
    if not outcome or outcome[0] is not None:
        why = (f"MLflow did not answer within {wait:g} s" if not outcome
               else f"{type(outcome[0]).__name__}: {one_line(outcome[0])}")
        _LOG.warning("the MLflow run %s could not be marked KILLED (%s); it shows RUNNING "
                     "until `maml train --resume %s`", run_id, why, run_id)


def _rl_iteration(ctx: PipelineContext, stages: dict, it: int, state: dict,
                  record: dict) -> dict[str, float]:
    tasks = stages["sample_tasks"](ctx, it)
    pre = stages["collect_rollouts"](ctx, it, "pre", state, tasks)
    adapted = stages["adapt"](ctx, it, state, pre)
    later = []  # inner steps on fresh episodes: collect with the adapted policies, step again
    for step, phase in enumerate(ctx.learner.later_phases, start=1):
        later.append(stages["collect_rollouts"](ctx, it, phase, adapted, tasks))
        adapted = stages["adapt"](ctx, it, state, later[-1], step, adapted)
    post = stages["collect_rollouts"](ctx, it, "post", adapted, tasks)
    _, _, stats = stages["meta_update"](ctx, it, state, record, pre, post, tuple(later))
    phases = ["pre", *ctx.learner.later_phases, "post"]
    return {**stats, "pre_return": ctx.collected["pre"]["mean_return"],
            "post_return": ctx.collected["post"]["mean_return"],
            "env_steps": float(sum(ctx.collected[p]["env_steps"] for p in phases))}


def _validate(ctx: PipelineContext, stages: dict, selection: ModelSelection, done: int,
              tasks: pd.DataFrame) -> dict[str, float]:
    """Validate the model after ``done`` iterations for model selection; its metrics."""
    curve = stages["evaluate"](ctx, done, tasks, None, "validation")
    score = selection_score(curve, selection.select_steps)
    selection.add(done, score)
    metrics = {k.replace("eval_", "val_", 1): v
               for k, v in tracking.eval_metrics(summary_table(curve)).items()}
    return {**metrics, "val_score": score}


def _load_selected(ctx: PipelineContext, run_id: str, selection: ModelSelection) -> int | None:
    """Load the selected model (the best validation score) into the learner, from its
    checkpoint in the stage store; record the choice and the scores in MLflow. Its
    iteration, or None if no model was validated."""
    selected = selection.best()
    if selected is None:
        return None
    learner = ctx.learner
    if selected != learner.iteration:
        path = ctx.store.checkpoint_dir / f"iter-{selected:06d}.json"
        if not path.is_file():
            raise tracking.TrackingError(
                f"model selection chose iteration {selected}, whose checkpoint {str(path)!r} "
                "is gone from the stage store; restore it, or set "
                "evaluation.validation_tasks: 0 and resume to keep the last iterate")
        _, params, _ = load_checkpoint(path)
        learner.load_params(params, f"checkpoint {str(path)!r}")
        ctx.loaded_state = None
    tracking.set_tags(run_id, {"maml.selected_iteration": str(selected)})
    tracking.log_table(run_id, selection.table(), "evaluation/validation.csv")
    return selected


def _postfix(stats: dict[str, float]) -> dict[str, str]:
    out = {}
    for key, label in (("pre_return", "pre"), ("post_return", "post"), ("pre_mse", "pre"),
                       ("post_mse", "post")):
        if key in stats:
            out[label] = f"{stats[key]:.2f}"
    out["s/it"] = f"{stats['seconds_iteration']:.2f}"
    if "memory_resident_mb" in stats:
        out["mem"] = f"{stats['memory_resident_mb'] / 1024:.2f}G"
    if "memory_peak_mb" in stats:
        out["peak"] = f"{stats['memory_peak_mb'] / 1024:.2f}G"
    return out


def _log_outputs(run_id: str, learner: MetaLearner, config: RunConfig, curve: pd.DataFrame,
                 summary: pd.DataFrame, held_out: pd.DataFrame, selected: int | None) -> None:
    """Evaluation tables and plots of the finished run, as MLflow artifacts."""
    family = config.task.family
    history = tracking.metric_history(run_id, ["pre_return", "post_return", "pre_mse",
                                               "post_mse", "val_score"])
    if not history.empty:
        tracking.log_figure(run_id, plots.learning_curve(history, f"meta-training: {family}",
                                                         selected),
                            "plots/learning_curve.png")
    usage = tracking.metric_history(run_id, [key for key in tracking.get_run(run_id).data.metrics
                                             if key.startswith(("seconds_", "memory_"))])
    figure = plots.resources(usage, f"time and memory per meta-iteration: {family}")
    if figure is not None:
        tracking.log_figure(run_id, figure, "plots/resources.png")
    tracking.log_evaluation(run_id, curve, summary, plots.adaptation_curve(
        summary, family, f"adaptation on held-out: {family}"))
    if family == "navigation2d":
        tasks = held_out.head(4)
        before = learner.collect(learner.meta_params, tasks, 0, "plot")
        _, adapted, _ = learner.adapt_all(before, tasks, 0, prefix="plot-")
        after = learner.collect(adapted, tasks, 0, "plot-adapted")
        tracking.log_figure(run_id, plots.navigation_trajectories(tasks, before, after),
                            "plots/navigation_trajectories.png")
