"""Evaluation with the paper's protocol: return after 0..k policy-gradient adaptation steps.

Step 0 samples with the meta-learned parameters; each later step adapts on freshly sampled
episodes by one vanilla policy-gradient step (the first with step size alpha, later ones with
``later_step_scale`` * alpha, the paper's alpha / 2 by default) and samples again. Returns a
per-task table; ``summarize`` gives mean and 95% CI.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from maml_core.adaptation import (
    adapt,
    inner_step_size,
    policy_gradient_loss,
    split_meta_params,
)
from maml_core.advantages import process_episodes
from maml_core.config import PAPER_LATER_STEP_SCALE
from maml_core.episodes import Episodes
from maml_core.policies import Params
from maml_core.rollouts import EnvPool, collect_episodes
from maml_core.seeding import derive_seed
from maml_core.tasks.base import TASK_ID


def adaptation_curve(pool: EnvPool, policy, meta_params: Params, tasks: pd.DataFrame,
                     steps: int, step_size: float, episodes_per_task: int, horizon: int,
                     gamma: float, gae_lambda: float, seed: int,
                     normalize_advantages: bool = True,
                     on_episodes: Callable[[int, Episodes], None] | None = None,
                     later_step_scale: float = PAPER_LATER_STEP_SCALE) -> pd.DataFrame:
    """Per-task table ``task_id, step, return`` for adaptation steps 0..``steps``.

    Seeds derive from (``seed``, step, task id), so the same tasks and seed give the same
    episodes for every model compared. ``on_episodes(step, episodes)`` sees each step's
    episodes (e.g. to measure what the adapted policy does, beyond its return).
    """
    theta, learned = split_meta_params({k: v.detach() for k, v in meta_params.items()})
    task_ids = tasks[TASK_ID].to_numpy()
    env = pool.get(tasks, episodes_per_task, horizon)
    rows = []
    params: Params = theta
    for step in range(steps + 1):
        seeds = [derive_seed(seed, "evaluate", step, int(t)) for t in task_ids]
        episodes = collect_episodes(env, policy, params, seeds, horizon,
                                    context=f"evaluation, adaptation step {step}")
        if on_episodes is not None:
            on_episodes(step, episodes)
        returns = episodes.task_returns().cpu().numpy()
        rows.append(pd.DataFrame({TASK_ID: task_ids, "step": step, "return": returns}))
        if step == steps:
            break
        process_episodes(episodes, gamma, gae_lambda, normalize_advantages)
        alpha = inner_step_size(learned if learned is not None else step_size, step,
                                later_step_scale)
        batched = params["layers.0.weight"].dim() == 3
        with torch.no_grad():
            params, _ = adapt(params, policy_gradient_loss(policy, episodes), alpha,
                              num_tasks=None if batched else len(tasks))
    return pd.concat(rows, ignore_index=True)


def summarize(curve: pd.DataFrame, value: str = "return") -> pd.DataFrame:
    """Mean and 95% confidence interval (1.96 sd / sqrt(n)) over tasks, per step."""
    def ci95(x):
        return 1.96 * float(np.std(x, ddof=0)) / math.sqrt(max(len(x), 1))

    grouped = curve.groupby("step")[value]
    return pd.DataFrame({f"mean_{value}": grouped.mean(), "ci95": grouped.agg(ci95),
                         "n_tasks": grouped.size()}).reset_index()


def selection_score(curve: pd.DataFrame, steps: int) -> float:
    """The model-selection score of an adaptation curve: the mean over tasks and adaptation
    steps 1..``steps`` of the return (supervised curves: of minus the MSE), higher is better."""
    if steps < 1:
        raise ValueError(f"selection needs at least one adaptation step, got {steps}")
    value, sign = ("return", 1.0) if "return" in curve.columns else ("mse", -1.0)
    chosen = curve[(curve["step"] >= 1) & (curve["step"] <= steps)]
    if chosen["step"].nunique() != steps:
        raise ValueError(f"the curve holds steps {sorted(curve['step'].unique().tolist())}, "
                         f"selection scores 1..{steps}")
    return sign * float(chosen.groupby("step")[value].mean().mean())
