"""The meta-objective: the post-adaptation loss of every task, as a function of theta.

It recomputes the differentiable inner step from the pre-adaptation episodes (so no autograd
graph crosses a stage boundary) and scores the adapted policies on the post-adaptation episodes
with one of three losses:

* ``pg``: the policy-gradient loss -E[log pi_phi(a|s) A] (the paper's meta-gradient, used by
  Adam/SGD);
* ``surrogate``: the importance-sampled surrogate -E[pi_phi / pi_old A] (TRPO);
* ``clipped``: the clipped surrogate -E[min(r A, clip(r, 1 - eps, 1 + eps) A)] (ProMP/PPO style);

and the KL divergence between the sampling (old) and the new adapted policies on the post states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from maml_core.adaptation import adapt_policy, masked_task_mean
from maml_core.episodes import Episodes
from maml_core.policies import Params


@dataclass
class MetaBatch:
    """What one meta-update needs: pre- and post-adaptation episodes of the same tasks."""

    pre: Episodes
    post: Episodes

    def __post_init__(self):
        if self.pre.num_tasks != self.post.num_tasks:
            raise ValueError(f"pre-adaptation episodes have {self.pre.num_tasks} tasks but "
                             f"post-adaptation ones {self.post.num_tasks}")
        if self.post.advantages is None or self.pre.advantages is None:
            raise ValueError("MetaBatch needs episodes with advantages (process_episodes)")


@dataclass
class ObjectiveValue:
    loss: Tensor  # scalar, mean over tasks
    task_losses: Tensor  # [N]
    kl: Tensor | None  # scalar mean KL(old || new), if an old policy was given
    adapted: Params  # batched adapted parameters


class MetaObjective:
    """Post-adaptation loss of ``policy`` on a ``MetaBatch``, differentiable in theta."""

    def __init__(self, policy, batch: MetaBatch, step_size: float, num_steps: int = 1,
                 first_order: bool = False):
        self.policy, self.batch = policy, batch
        self.step_size, self.num_steps, self.first_order = step_size, num_steps, first_order
        post = batch.post
        self._obs = post.task_major("observations")
        self._actions = post.task_major("actions")
        self._adv = post.task_major("advantages")
        self._mask = post.task_major("masks")
        self.old_dist: tuple[Tensor, ...] | None = None
        self.old_log_prob: Tensor | None = None

    def adapted(self, meta_params: Params, create_graph: bool | None = None) -> Params:
        phi, _ = adapt_policy(self.policy, meta_params, self.batch.pre, self.step_size,
                              self.num_steps, self.first_order, create_graph)
        return phi

    def set_old_policy(self, meta_params: Params) -> None:
        """Freeze the current adapted policies as the 'old' (sampling) policies."""
        with torch.no_grad():
            phi = self.adapted({k: v.detach() for k, v in meta_params.items()})
            self.old_dist = tuple(d.detach() for d in self.policy.distribution(phi, self._obs))
            self.old_log_prob = self.policy.log_prob_of(self.old_dist, self._actions)

    def __call__(self, meta_params: Params, kind: str = "pg", clip_eps: float = 0.2,
                 create_graph: bool | None = None, with_kl: bool = True) -> ObjectiveValue:
        phi = self.adapted(meta_params, create_graph)
        dist = self.policy.distribution(phi, self._obs)
        log_prob = self.policy.log_prob_of(dist, self._actions)
        if kind == "pg":
            per_step = log_prob * self._adv
        else:
            if self.old_log_prob is None:
                raise RuntimeError(f"the {kind!r} loss needs set_old_policy() first")
            ratio = torch.exp(log_prob - self.old_log_prob)
            per_step = ratio * self._adv
            if kind == "clipped":
                clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * self._adv
                per_step = torch.minimum(per_step, clipped)
            elif kind != "surrogate":
                raise ValueError(f"unknown meta-loss kind {kind!r}")
        task_losses = -masked_task_mean(per_step, self._mask)
        kl = None
        if with_kl and self.old_dist is not None:
            kl = masked_task_mean(self.policy.kl(self.old_dist, dist), self._mask).mean()
        return ObjectiveValue(task_losses.mean(), task_losses, kl, phi)

    def kl_on_tasks(self, meta_params: Params, tasks: Tensor) -> Tensor:
        """Mean KL(old || new) over a subset of tasks (for subsampled Hessian-vector products)."""
        if self.old_dist is None:
            raise RuntimeError("kl_on_tasks needs set_old_policy() first")
        phi, _ = adapt_policy(self.policy, meta_params, self.batch.pre.select_tasks(tasks),
                              self.step_size, self.num_steps, self.first_order)
        old = tuple(d.index_select(0, tasks) for d in self.old_dist)
        dist = self.policy.distribution(phi, self._obs.index_select(0, tasks))
        return masked_task_mean(self.policy.kl(old, dist), self._mask.index_select(0, tasks)).mean()
