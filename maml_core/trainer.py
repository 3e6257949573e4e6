"""The meta-learner: the stages of a meta-iteration as methods, and the loop that chains them.

Each stage is a function of serializable inputs (task table, parameters, episodes) plus the
learner's fixed parts (config, family, policy architecture), so the pipeline can run any of them
alone. Every random draw derives from (run seed, iteration, stage, task id).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from maml_core.adaptation import (
    adapt,
    adapt_policy,
    init_step_sizes,
    inner_step_size,
    policy_gradient_loss,
    split_meta_params,
)
from maml_core.advantages import process_episodes
from maml_core.allocator import MIB, release_free_memory, resident_bytes
from maml_core.checkpoint import (
    CheckpointError,
    check_params_fit,
    load_checkpoint,
    save_checkpoint,
)
from maml_core.config import MAMLConfig
from maml_core.episodes import Episodes
from maml_core.evaluation import adaptation_curve, summarize
from maml_core.meta_objective import MetaBatch, MetaObjective
from maml_core.optimizers import make_meta_optimizer
from maml_core.policies import Params, build_policy
from maml_core.rollouts import EnvPool, collect_episodes
from maml_core.seeding import derive_seed, generator, task_seeds
from maml_core.supervised import regression_curve, sample_support_query, supervised_meta_loss
from maml_core.tasks.base import TASK_ID


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. repeated rejected updates)."""


@dataclass
class IterationResult:
    iteration: int
    stats: dict[str, float] = field(default_factory=dict)


class MetaLearner:
    """MAML for one configuration: the policy, the meta-parameters and the meta-optimizer."""

    def __init__(self, config: MAMLConfig):
        self.config = config
        self.family = config.family()
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.rl = self.family.kind == "rl"
        self.horizon = config.task.horizon or self.family.default_horizon
        self.policy = build_policy(self.family, config.policy.hidden_sizes,
                                   config.policy.activation, config.policy.init_log_std,
                                   generator(derive_seed(config.seed, "init")),
                                   config.policy.min_log_std)
        self.policy.to(device=self.device, dtype=self.dtype)
        params = self.policy.params()
        if config.inner.learn_step_size:
            params.update(init_step_sizes(params, config.inner.step_size,
                                          config.inner.step_size_per))
        self.meta_params: Params = {k: v.requires_grad_() for k, v in params.items()}
        self.optimizer = make_meta_optimizer(self.meta_params, config.meta_optimizer,
                                             config.inner.step_size_lr,
                                             config.inner.step_size_min)
        self.iteration = 0
        self.rejected_in_a_row = 0
        self.pool = EnvPool(self.family, self.device, self.dtype) if self.rl else None

    # ----------------------------------------------------------------- stages
    def sample_tasks(self, iteration: int, n: int | None = None) -> pd.DataFrame:
        rng = np.random.default_rng(derive_seed(self.config.seed, iteration, "sample_tasks"))
        return self.family.sample_tasks(n or self.config.meta_batch_size, rng)

    def collect(self, params: Params, tasks: pd.DataFrame, iteration: int, stage: str
                ) -> Episodes:
        """Episodes of ``params`` (shared or one set per task) on ``tasks``, with advantages;
        ``episodes_for(stage)`` episodes per task."""
        cfg = self.config
        env = self.pool.get(tasks, self.episodes_for(stage), self.horizon)
        seeds = task_seeds(cfg.seed, iteration, stage, tasks[TASK_ID])
        theta, _ = split_meta_params(params)
        episodes = collect_episodes(env, self.policy, theta, seeds, self.horizon,
                                    context=f"iteration {iteration}, phase {stage!r}")
        return process_episodes(episodes, cfg.gamma, cfg.gae_lambda, cfg.normalize_advantages)

    def episodes_for(self, stage: str) -> int:
        """Episodes per task that meta-training samples in phase ``stage``: the inner steps'
        (``pre`` and the fresh ``later_phases``) take ``inner.episodes_per_task`` where set."""
        inner = self.config.inner
        if inner.episodes_per_task and (stage == "pre" or stage in self.later_phases):
            return inner.episodes_per_task
        return self.config.episodes_per_task

    @property
    def later_phases(self) -> list[str]:
        """The collect phases between ``pre`` and ``post`` (inner steps on fresh episodes):
        ``pre1`` is sampled with the policies adapted once, ``pre2`` twice, ..."""
        inner = self.config.inner
        return [f"pre{k}" for k in range(1, inner.num_steps)] if inner.fresh_episodes else []

    def adapt(self, pre: Episodes, meta_params: Params | None = None) -> Params:
        """Adapted parameters (one set per task, detached) for sampling the next phase: all
        inner steps on ``pre``, or, with fresh episodes, the first step only
        (``adapt_further`` takes the others)."""
        inner = self.config.inner
        steps = 1 if self.later_phases else inner.num_steps
        with torch.no_grad():
            phi, _ = adapt_policy(self.policy, self.detached_params(meta_params), pre,
                                  inner.step_size, steps, inner.first_order)
        return phi

    def adapt_further(self, episodes: Episodes, phi: Params, step: int,
                      meta_params: Params | None = None) -> Params:
        """Inner step ``step`` (1-based count of the steps already taken) on fresh episodes:
        one step from the per-task ``phi`` with ``inner_step_size(alpha, step)``; learned step
        sizes come from ``meta_params`` (default: the learner's)."""
        _, learned = split_meta_params(self.detached_params(meta_params))
        alpha = inner_step_size(learned if learned is not None else self.config.inner.step_size,
                                step)
        with torch.no_grad():
            phi, _ = adapt(phi, policy_gradient_loss(self.policy, episodes), alpha)
        return phi

    def adapt_all(self, pre: Episodes, tasks: pd.DataFrame, iteration: int, prefix: str = ""
                  ) -> tuple[list[Episodes], Params, float]:
        """The whole inner loop from the ``pre`` episodes of ``tasks``: the fresh episode sets
        of the later steps (phases ``prefix + pre1``, ...), the final adapted parameters and
        the seconds spent adapting (the rest is sampling)."""
        t = time.perf_counter()
        phi = self.adapt(pre)
        seconds = time.perf_counter() - t
        later = []
        for step, phase in enumerate(self.later_phases, start=1):
            later.append(self.collect(phi, tasks, iteration, prefix + phase))
            t = time.perf_counter()
            phi = self.adapt_further(later[-1], phi, step)
            seconds += time.perf_counter() - t
        return later, phi, seconds

    def objective(self, pre: Episodes, post: Episodes,
                  later: tuple[Episodes, ...] = ()) -> MetaObjective:
        inner = self.config.inner
        if len(later) != len(self.later_phases):
            raise ValueError(f"the config's inner loop samples {len(self.later_phases)} later "
                             f"episode sets ({', '.join(self.later_phases) or 'none'}), "
                             f"{len(later)} were given")
        return MetaObjective(self.policy, MetaBatch(pre, post, later), inner.step_size,
                             inner.num_steps, inner.first_order, inner.every_step_objective)

    def meta_update(self, pre: Episodes, post: Episodes,
                    later: tuple[Episodes, ...] = ()) -> dict[str, float]:
        """One meta-optimizer step on theta from pre- and post-adaptation episodes (and those
        of the later inner steps, with fresh episodes)."""
        stats = self.optimizer.step(self.objective(pre, post, later))
        # The iteration's graphs are freed: a bound on what the heap keeps. The process's
        # memory goes with the stats (MLflow), so a long run's memory can be watched.
        released = release_free_memory()
        resident = resident_bytes()
        if resident is not None:
            stats["memory_resident_mb"] = resident / MIB
        stats["memory_released_mb"] = (released or 0) / MIB
        # Whether a trim ran at all: one that freed nothing reads 0 MB above, as no trim does.
        stats["memory_trimmed"] = float(released is not None)
        self._count_rejections(stats)
        stats["rejected_in_a_row"] = float(self.rejected_in_a_row)
        return stats

    def evaluation_protocol(self, steps: int | None = None, seed: int | None = None,
                            episodes_per_task: int | None = None) -> dict:
        """What ``evaluate`` adapts and measures with, given its arguments (None: the config's
        ``evaluation.*``, then the training values): adaptation steps and seed; RL families
        also episodes per task and step, the first step's size (``learned`` for Meta-SGD
        sizes) and the scale of every later step; supervised ones K and the step size."""
        ev, inner = self.config.evaluation, self.config.inner
        protocol = {"steps": ev.steps if steps is None else steps,
                    "seed": ev.seed if seed is None else seed}
        if not self.rl:
            return {**protocol, "k_shot": self.config.k_shot, "step_size": inner.step_size}
        return {**protocol,
                "episodes_per_task": (episodes_per_task or ev.episodes_per_task
                                      or self.config.episodes_per_task),
                "step_size": "learned" if inner.learn_step_size else inner.step_size,
                "later_step_scale": ev.later_step_scale}

    def evaluate(self, tasks: pd.DataFrame, steps: int | None = None,
                 meta_params: Params | None = None, seed: int | None = None,
                 episodes_per_task: int | None = None,
                 on_episodes: Callable[[int, Episodes], None] | None = None) -> pd.DataFrame:
        """Per-task adaptation curve (RL: ``return``; supervised: ``mse``) for 0..steps;
        ``on_episodes(step, episodes)`` sees each step's episodes (RL)."""
        protocol = self.evaluation_protocol(steps, seed, episodes_per_task)
        params = self.detached_params(meta_params)
        if not self.rl:
            return regression_curve(self.policy, params, self.family, tasks, self.config.k_shot,
                                    protocol["steps"], self.config.inner.step_size,
                                    protocol["seed"], self.device, self.dtype)
        # The evaluation's envs are built for it and closed after it: kept beside the training
        # pool, 40 tasks x 20 episodes of MuJoCo sub-envs held about 0.9 GB between evaluations.
        pool = EnvPool(self.family, self.device, self.dtype)
        try:
            return adaptation_curve(pool, self.policy, params, tasks, protocol["steps"],
                                    self.config.inner.step_size,
                                    protocol["episodes_per_task"], self.horizon,
                                    self.config.gamma, self.config.gae_lambda, protocol["seed"],
                                    self.config.normalize_advantages, on_episodes,
                                    protocol["later_step_scale"])
        finally:
            pool.close()

    def validation_tasks(self) -> pd.DataFrame | None:
        """The validation task set of model selection, or None when it is off."""
        from maml_core.tasksets import validation_tasks

        return validation_tasks(self.config, self.family)

    @property
    def validation_seed(self) -> int:
        """The episode seed of validation: apart from the held-out evaluation's."""
        return derive_seed(self.config.evaluation.seed, "validation")

    # ----------------------------------------------------------------- loop
    def step(self) -> IterationResult:
        """One meta-iteration: sample tasks, collect, adapt, collect, meta-update."""
        it = self.iteration
        if not self.rl:
            return self._supervised_step()
        t0 = time.perf_counter()
        tasks = self.sample_tasks(it)
        pre = self.collect(self.meta_params, tasks, it, "pre")
        later, phi, adapting = self.adapt_all(pre, tasks, it)
        post = self.collect(phi, tasks, it, "post")
        t3 = time.perf_counter()
        stats = self.meta_update(pre, post, tuple(later))
        t4 = time.perf_counter()
        stats.update(pre_return=float(pre.task_returns().mean()),
                     post_return=float(post.task_returns().mean()),
                     env_steps=float(sum(e.num_steps for e in (pre, *later, post))),
                     seconds_sampling=(t3 - t0) - adapting, seconds_adaptation=adapting,
                     seconds_meta_update=t4 - t3, seconds_iteration=t4 - t0)
        self.iteration += 1
        return IterationResult(it, stats)

    def _supervised_step(self) -> IterationResult:
        it, cfg = self.iteration, self.config
        t0 = time.perf_counter()
        tasks = self.sample_tasks(it)
        support, query = sample_support_query(self.family, tasks, cfg.k_shot, cfg.seed, it,
                                              self.device, self.dtype)
        loss, pre_loss = supervised_meta_loss(self.policy, self.meta_params, support, query,
                                              cfg.inner.step_size, cfg.inner.num_steps,
                                              cfg.inner.first_order)
        stats = self.optimizer.apply_loss(loss)
        self._count_rejections(stats)
        stats["rejected_in_a_row"] = float(self.rejected_in_a_row)
        stats.update(meta_loss=float(loss.detach()), pre_mse=float(pre_loss),
                     post_mse=float(loss.detach()),
                     seconds_iteration=time.perf_counter() - t0)
        self.iteration += 1
        return IterationResult(it, stats)

    def train(self, iterations: int | None = None,
              callback: Callable[[IterationResult], None] | None = None) -> list[IterationResult]:
        results = []
        end = iterations if iterations is not None else self.config.iterations
        while self.iteration < end:
            result = self.step()
            results.append(result)
            if callback is not None:
                callback(result)
        return results

    def _count_rejections(self, stats: dict[str, float]) -> None:
        if stats.get("rejected"):
            self.rejected_in_a_row += 1
            limit = self.config.meta_optimizer.max_rejected_updates
            if self.rejected_in_a_row >= limit:
                raise TrainingError(
                    f"{self.rejected_in_a_row} meta-updates in a row were rejected (non-finite "
                    f"meta-gradient or no acceptable TRPO step) at iteration {self.iteration}; "
                    "lower the step sizes (inner.step_size, meta_optimizer.lr / max_kl)")
        else:
            self.rejected_in_a_row = 0

    def detached_params(self, meta_params: Params | None = None) -> Params:
        """A detached view of ``meta_params`` (default: the learner's own)."""
        return {k: v.detach() for k, v in (meta_params or self.meta_params).items()}

    # ----------------------------------------------------------------- state
    def held_out_tasks(self) -> pd.DataFrame:
        """The evaluation task set: ``task.test_tasks`` if given, else a seeded draw."""
        from maml_core.tasksets import held_out_tasks

        return held_out_tasks(self.config, self.family)

    def save(self, directory, extra: dict | None = None):
        tensors, meta = self.optimizer.state_dict()
        return save_checkpoint(directory, self.iteration, self.detached_params(None), tensors,
                               {**meta, "rejected_in_a_row": self.rejected_in_a_row},
                               self.config.model_dump(mode="json"), self.policy.architecture(),
                               {"env_version": self.family.env_version, **(extra or {})})

    def load_model_params(self, params: Params, source: str) -> None:
        """Load a model's parameters; meta-parameters it lacks (e.g. Meta-SGD step sizes of a
        model trained without them) keep the learner's values."""
        self.load_params({**self.detached_params(), **params}, source)

    def load_params(self, params: Params, source: str) -> None:
        check_params_fit(params, self.meta_params, source)
        with torch.no_grad():
            for k, v in self.meta_params.items():
                v.copy_(params[k].to(v))

    def restore(self, path) -> dict:
        """Load parameters, optimizer state and iteration from a checkpoint."""
        manifest, params, optim = load_checkpoint(path)
        if manifest.get("architecture") != self.policy.architecture():
            raise CheckpointError(f"checkpoint {str(path)!r} was saved for policy "
                                  f"{manifest.get('architecture')}, but the config builds "
                                  f"{self.policy.architecture()}")
        made_on = int(manifest.get("env_version", 1))  # checkpoints before versions: 1
        if made_on != self.family.env_version:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was made on version {made_on} of the "
                f"{self.family.name!r} environment, this code runs version "
                f"{self.family.env_version} (its dynamics or reward changed; see "
                "maml_core/tasks): resuming would continue on a different problem; start a "
                "new run instead")
        self._check_same_dynamics(manifest, path)
        self.load_params(params, f"checkpoint {str(path)!r}")
        opt_meta = dict(manifest.get("optimizer", {}))
        self.rejected_in_a_row = int(opt_meta.pop("rejected_in_a_row", 0))
        self.optimizer.load_state_dict({k: v.to(self.device) for k, v in optim.items()},
                                       opt_meta)
        if "rng_torch" in manifest:
            torch.set_rng_state(manifest["rng_torch"])
        self.iteration = int(manifest["iteration"])
        return manifest

    def _check_same_dynamics(self, manifest: dict, path) -> None:
        """Refuse a checkpoint whose config gave the environment other dynamics (e.g. the
        half-cheetah's ``frame_skip``); its stored config says what they were."""
        from maml_core.tasks import get_task_family

        task = dict(manifest.get("config", {}).get("task") or {})
        try:
            made = get_task_family(task.get("family", self.family.name),
                                   **(task.get("options") or {})).dynamics()
        except (TypeError, ValueError):
            made = None
        if made is not None and made != self.family.dynamics():
            raise CheckpointError(
                f"checkpoint {str(path)!r} was trained with {self.family.name!r} dynamics "
                f"{made}, the config asks for {self.family.dynamics()} (task.options): "
                "resuming would continue on a different problem; keep the checkpoint's "
                "options or start a new run")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def summary_table(curve: pd.DataFrame) -> pd.DataFrame:
    value = "return" if "return" in curve.columns else "mse"
    return summarize(curve, value)
