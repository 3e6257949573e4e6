"""The paper's baselines, adapted (where they adapt) with the same protocol as MAML.

* ``random``: a freshly initialized policy (its own seed);
* ``pretrained``: one policy trained on all tasks jointly -- by policy gradient on episodes of
  tasks drawn from the family (RL), or by regression on examples pooled over tasks (supervised);
* ``oracle`` (2D navigation only): a controller that sees the goal. It needs no adaptation, so
  its adaptation curve is the same value at every step.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch

from maml_core.adaptation import expand_to_tasks, policy_gradient_loss, split_meta_params
from maml_core.policies import Params, build_policy
from maml_core.seeding import derive_seed, generator
from maml_core.supervised import mse_loss, sample_support_query
from maml_core.tasks.base import TASK_ID

ORACLE_FAMILIES = ("navigation2d",)


def random_params(learner, seed: int = 1) -> Params:
    """Parameters of a freshly initialized policy of the learner's architecture."""
    cfg = learner.config
    model = build_policy(learner.family, cfg.policy.hidden_sizes, cfg.policy.activation,
                         cfg.policy.init_log_std, generator(derive_seed(seed, "random-init")))
    return {k: v.to(device=learner.device, dtype=learner.dtype)
            for k, v in model.params().items()}


def pretrained_params(learner, iterations: int, lr: float = 1e-2,
                      callback: Callable[[int, dict[str, float]], None] | None = None
                      ) -> Params:
    """Train one policy on all tasks jointly, starting from the learner's initialization.

    Each iteration draws ``meta_batch_size`` tasks (the meta-training draw of that iteration)
    and takes one Adam step on the policy-gradient loss of fresh episodes (RL) or on the MSE of
    ``k_shot`` examples per task (supervised). ``callback(iteration, stats)`` gets the batch's
    ``pretrain_return`` and ``env_steps`` (RL: episodes collected before that iteration's
    update) or its ``pretrain_mse`` (supervised, before the update)."""
    theta, _ = split_meta_params({k: v.detach() for k, v in learner.meta_params.items()})
    params = {k: v.clone().requires_grad_() for k, v in theta.items()}
    optimizer = torch.optim.Adam(list(params.values()), lr=lr)
    cfg = learner.config
    for it in range(iterations):
        tasks = learner.sample_tasks(it)
        if learner.rl:
            episodes = learner.collect(params, tasks, it, "pretrain")
            loss = policy_gradient_loss(learner.policy, episodes)(
                expand_to_tasks(params, len(tasks))).mean()
            stats = {"pretrain_return": float(episodes.task_returns().mean()),
                     "env_steps": float(episodes.num_steps)}
        else:
            (x, y), _ = sample_support_query(learner.family, tasks, cfg.k_shot, cfg.seed, it,
                                             learner.device, learner.dtype)
            loss = mse_loss(learner.policy, x, y)(expand_to_tasks(params, len(tasks))).mean()
            stats = {"pretrain_mse": float(loss.detach())}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if callback is not None:
            callback(it, stats)
    return {k: v.detach() for k, v in params.items()}


def goal_seeking_returns(env, horizon: int | None = None,
                         seeds: list[int] | None = None) -> torch.Tensor:
    """Mean undiscounted return per task [N] of the controller that sees the goal in a 2D
    navigation environment (``maml_core.tasks.navigation.Navigation2DEnv``): action =
    clip(goal - position, -max_action, max_action), the largest allowed step straight towards
    the goal in each coordinate (given in the environment's action units, which may be that
    displacement divided by ``action_scale``). Rewards count as in ``collect_episodes``: up to
    and including the step that ends an episode (reaching the goal, when the environment
    terminates there)."""
    horizon = int(horizon or env.horizon)
    goal = torch.stack([env.task_column("goal_x"), env.task_column("goal_y")], dim=-1)
    scale = float(getattr(env, "action_scale", 1.0))
    position, _ = env.reset(seed=seeds)
    total = torch.zeros(env.num_envs, dtype=env.dtype, device=env.device)
    alive = torch.ones_like(total)
    for _ in range(horizon):
        action = (goal - position).clamp(-env.max_action, env.max_action) / scale
        position, reward, terminated, truncated, _ = env.step(action)
        total = total + reward * alive
        alive = alive * (~(terminated | truncated)).to(env.dtype)
    return total.view(env.num_tasks, env.episodes_per_task).mean(-1)


def oracle_curve(learner, tasks: pd.DataFrame, steps: int | None = None,
                 seed: int | None = None, episodes_per_task: int | None = None
                 ) -> pd.DataFrame:
    """Per-task table ``task_id, step, return`` of the oracle on ``tasks``, in the shape of
    ``MetaLearner.evaluate``: the goal-seeking controller (``goal_seeking_returns``) with the
    learner's horizon and evaluation episodes. The oracle does not adapt, so every step
    0..``steps`` holds the same return (a flat curve, for comparison with the others)."""
    name = learner.family.name
    if name not in ORACLE_FAMILIES:
        raise ValueError(f"the oracle baseline exists for {', '.join(ORACLE_FAMILIES)} only "
                         f"(a controller that sees the goal), not for task family {name!r}")
    ev = learner.config.evaluation
    steps = ev.steps if steps is None else steps
    seed = ev.seed if seed is None else seed
    episodes = episodes_per_task or ev.episodes_per_task or learner.config.episodes_per_task
    env = learner.pool.get(tasks, episodes, learner.horizon)
    ids = tasks[TASK_ID].to_numpy()
    seeds = [derive_seed(seed, "evaluate", 0, int(t)) for t in ids]
    with torch.no_grad():
        returns = goal_seeking_returns(env, learner.horizon, seeds).cpu().numpy()
    return pd.concat([pd.DataFrame({TASK_ID: ids, "step": step, "return": returns})
                      for step in range(steps + 1)], ignore_index=True)
