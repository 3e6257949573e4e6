"""The paper's baselines, adapted with the same protocol as MAML.

* ``random``: a freshly initialized policy (its own seed);
* ``pretrained``: one policy trained on all tasks jointly -- by policy gradient on episodes of
  tasks drawn from the family (RL), or by regression on examples pooled over tasks (supervised).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from maml_core.adaptation import expand_to_tasks, policy_gradient_loss, split_meta_params
from maml_core.policies import Params, build_policy
from maml_core.seeding import derive_seed, generator
from maml_core.supervised import mse_loss, sample_support_query


def random_params(learner, seed: int = 1) -> Params:
    """Parameters of a freshly initialized policy of the learner's architecture."""
    cfg = learner.config
    model = build_policy(learner.family, cfg.policy.hidden_sizes, cfg.policy.activation,
                         cfg.policy.init_log_std, generator(derive_seed(seed, "random-init")))
    return {k: v.to(device=learner.device, dtype=learner.dtype)
            for k, v in model.params().items()}


def pretrained_params(learner, iterations: int, lr: float = 1e-2,
                      callback: Callable[[int, float], None] | None = None) -> Params:
    """Train one policy on all tasks jointly, starting from the learner's initialization."""
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
            score = float(episodes.task_returns().mean())
        else:
            (x, y), _ = sample_support_query(learner.family, tasks, cfg.k_shot, cfg.seed, it,
                                             learner.device, learner.dtype)
            loss = mse_loss(learner.policy, x, y)(expand_to_tasks(params, len(tasks))).mean()
            score = float(loss.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if callback is not None:
            callback(it, score)
    return {k: v.detach() for k, v in params.items()}
