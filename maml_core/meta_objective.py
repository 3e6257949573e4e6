"""The meta-objective: the post-adaptation loss of every task, as a function of theta.

It recomputes the differentiable inner step from the pre-adaptation episodes (so no autograd
graph crosses a stage boundary) -- or, with inner steps on fresh episodes, each step from the
episodes its policy sampled -- and scores the adapted policies on the post-adaptation episodes
with one of three losses (with ``every_step``, the mean of the losses after each inner step on
fresh episodes, each scored on the episodes its policy sampled):

* ``pg``: the policy-gradient loss -E[log pi_phi(a|s) A] (the paper's meta-gradient, used by
  Adam/SGD);
* ``surrogate``: the importance-sampled surrogate -E[pi_phi / pi_old A] (TRPO);
* ``clipped``: the clipped surrogate -E[min(r A, clip(r, 1 - eps, 1 + eps) A)] (ProMP/PPO style);

and the KL divergence between the sampling (old) and the new adapted policies on the post states.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from maml_core.adaptation import (
    InnerChain,
    adapt_policy,
    adapt_policy_resampled,
    adapt_policy_resampled_with_inner_steps,
    adapt_policy_with_inner_steps,
    masked_task_mean,
    policy_gradient_loss,
    policy_gradient_loss_on,
    task_major_tensors,
)
from maml_core.allocator import tune_allocator
from maml_core.episodes import Episodes
from maml_core.policies import Params


@dataclass
class MetaBatch:
    """What one meta-update needs: pre- and post-adaptation episodes of the same tasks, and,
    for inner steps on fresh episodes, the episodes of steps 2, 3, ... (``later``: sampled with
    the policies adapted by one, two, ... steps)."""

    pre: Episodes
    post: Episodes
    later: tuple[Episodes, ...] = ()

    def __post_init__(self):
        self.later = tuple(self.later)
        for name, e in (("post", self.post),
                        *((f"inner step {k + 2}", e) for k, e in enumerate(self.later))):
            if e.num_tasks != self.pre.num_tasks:
                raise ValueError(f"pre-adaptation episodes have {self.pre.num_tasks} tasks but "
                                 f"the {name} ones {e.num_tasks}")
        if any(e.advantages is None for e in (self.pre, self.post, *self.later)):
            raise ValueError("MetaBatch needs episodes with advantages (process_episodes)")

    @property
    def inner_sets(self) -> list[Episodes]:
        """The episodes of each inner step, in order."""
        return [self.pre, *self.later]


@dataclass
class _Scored:
    """Episodes that an adapted policy is scored on, task-major (copied once, reused by every
    evaluation), and the distribution of the policy that sampled them once frozen as 'old'."""

    obs: Tensor
    actions: Tensor
    adv: Tensor
    mask: Tensor
    old_dist: tuple[Tensor, ...] | None = None
    old_log_prob: Tensor | None = None

    @classmethod
    def of(cls, episodes: Episodes) -> _Scored:
        return cls(*task_major_tensors(episodes))

    def freeze(self, policy, dist: tuple[Tensor, ...]) -> None:
        self.old_dist = tuple(d.detach() for d in dist)
        self.old_log_prob = policy.log_prob_of(self.old_dist, self.actions)


def _mean(values: list[Tensor]) -> Tensor:
    return values[0] if len(values) == 1 else torch.stack(values).mean(0)


@dataclass
class ObjectiveValue:
    loss: Tensor  # scalar, mean over tasks
    task_losses: Tensor  # [N]
    kl: Tensor | None  # scalar mean KL(old || new), if an old policy was given
    # The batched adapted parameters scored: after each inner step, or after the last only.
    scored: list[Params]
    # The differentiable inner steps (second-order), for Hessian-vector products through them;
    # None otherwise.
    inner: InnerChain | None = None
    # The terms of ``kl``, one per scored parameter set; they sum to it.
    kl_terms: list[Tensor] | None = None

    @property
    def adapted(self) -> Params:
        """The batched adapted parameters after the last inner step."""
        return self.scored[-1]


class MetaObjective:
    """Post-adaptation loss of ``policy`` on a ``MetaBatch``, differentiable in theta."""

    def __init__(self, policy, batch: MetaBatch, step_size: float, num_steps: int = 1,
                 first_order: bool = False, every_step: bool = False):
        tune_allocator()
        self.policy, self.batch = policy, batch
        self.step_size, self.num_steps, self.first_order = step_size, num_steps, first_order
        if batch.later and num_steps != 1 + len(batch.later):
            raise ValueError(f"{num_steps} inner steps on fresh episodes need {num_steps - 1} "
                             f"later episode sets, the batch has {len(batch.later)}")
        if every_step and not batch.later:
            raise ValueError("a meta-objective over every inner step scores each step on the "
                             "episodes its policy sampled: it needs inner steps on fresh "
                             "episodes (inner.fresh_episodes with inner.num_steps > 1)")
        # The policy after inner step k is scored on the episodes it sampled: later[k - 1]
        # for the steps before the last (every_step), post for the last one.
        self.every_step = every_step
        self._scored = [_Scored.of(e) for e in ((*batch.later, batch.post) if every_step
                                                 else (batch.post,))]
        # The inner losses of steps 2, 3, ... are on the episode sets that every_step also
        # scores: they share those task-major copies.
        if every_step:
            later = [policy_gradient_loss_on(policy, s.obs, s.actions, s.adv, s.mask)
                     for s in self._scored[:-1]]
        else:
            later = [policy_gradient_loss(policy, e) for e in batch.later]
        self._inner_losses = [policy_gradient_loss(policy, batch.pre), *later]

    @property
    def old_dist(self) -> tuple[Tensor, ...] | None:
        """The frozen sampling distribution on the post-adaptation episodes."""
        return self._scored[-1].old_dist

    @property
    def old_log_prob(self) -> Tensor | None:
        return self._scored[-1].old_log_prob

    def _adapt(self, meta_params: Params, create_graph: bool | None = None
               ) -> tuple[list[Params], InnerChain | None]:
        """The adapted parameters scored (one per scored episode set) and the inner steps."""
        if self.batch.later:
            steps, inner = adapt_policy_resampled_with_inner_steps(
                self.policy, meta_params, self.batch.inner_sets, self.step_size,
                self.first_order, create_graph, self._inner_losses)
            return self._scored_steps(steps), inner
        phi, _, inner = adapt_policy_with_inner_steps(
            self.policy, meta_params, self.batch.pre, self.step_size, self.num_steps,
            self.first_order, create_graph, loss_fn=self._inner_losses[0])
        return [phi], inner

    def _scored_steps(self, steps: list[Params]) -> list[Params]:
        """Of the parameters after each inner step, those scored: all, or the last."""
        return steps if self.every_step else steps[-1:]

    def _distributions(self, phis: list[Params]) -> list[tuple[Tensor, ...]]:
        return [self.policy.distribution(phi, s.obs) for phi, s in zip(phis, self._scored)]

    def adapted(self, meta_params: Params, create_graph: bool | None = None) -> Params:
        return self._adapt(meta_params, create_graph)[0][-1]

    def set_old_policy(self, meta_params: Params) -> None:
        """Freeze the current adapted policies as the 'old' (sampling) policies."""
        with torch.no_grad():
            phis, _ = self._adapt({k: v.detach() for k, v in meta_params.items()})
            for s, dist in zip(self._scored, self._distributions(phis)):
                s.freeze(self.policy, dist)

    def __call__(self, meta_params: Params, kind: str = "pg", clip_eps: float = 0.2,
                 create_graph: bool | None = None, with_kl: bool = True) -> ObjectiveValue:
        phis, inner = self._adapt(meta_params, create_graph)
        return self._value(phis, inner, self._distributions(phis), kind, clip_eps, with_kl)

    def at_old_policy(self, meta_params: Params, kind: str = "surrogate",
                      clip_eps: float = 0.2) -> ObjectiveValue:
        """``set_old_policy(meta_params)`` and ``self(meta_params, kind, with_kl=True)`` from one
        adaptation and one forward pass: the old policies are the (detached) adapted policies
        of this very evaluation, so the value and its derivatives are those of the two calls."""
        phis, inner = self._adapt(meta_params)
        dists = self._distributions(phis)
        for s, dist in zip(self._scored, dists):
            s.freeze(self.policy, dist)
        return self._value(phis, inner, dists, kind, clip_eps, with_kl=True)

    def _value(self, phis: list[Params], inner: InnerChain | None,
               dists: list[tuple[Tensor, ...]], kind: str, clip_eps: float, with_kl: bool
               ) -> ObjectiveValue:
        losses, kls = [], []
        for s, dist in zip(self._scored, dists):
            log_prob = self.policy.log_prob_of(dist, s.actions)
            if kind == "pg":
                per_step = log_prob * s.adv
            else:
                if s.old_log_prob is None:
                    raise RuntimeError(f"the {kind!r} loss needs set_old_policy() first")
                ratio = torch.exp(log_prob - s.old_log_prob)
                per_step = ratio * s.adv
                if kind == "clipped":
                    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * s.adv
                    per_step = torch.minimum(per_step, clipped)
                elif kind != "surrogate":
                    raise ValueError(f"unknown meta-loss kind {kind!r}")
            losses.append(-masked_task_mean(per_step, s.mask))
            if with_kl and s.old_dist is not None:
                kls.append(masked_task_mean(self.policy.kl(s.old_dist, dist), s.mask).mean())
        task_losses = _mean(losses)
        kl = _mean(kls) if kls else None
        kl_terms = kls if len(kls) == 1 else [k / len(kls) for k in kls]
        return ObjectiveValue(task_losses.mean(), task_losses, kl, phis, inner, kl_terms or None)

    def kl_hessian_product(self, meta_params: Params, value: ObjectiveValue,
                           structured: bool = True) -> Callable[[list[Tensor]], list[Tensor]]:
        """``v -> (d^2 KL / d theta^2) v`` at ``meta_params``, the exact Hessian of the mean
        KL(old || new) through the inner steps, for ``value = self.at_old_policy(meta_params)``.

        Each KL term (one per scored inner step k) is minimal (zero, with zero gradient) in its
        adapted parameters phi_k at the old policies, so its Hessian in theta is exactly
        ``J^(k)^T (d^2 KL_k / d phi_k^2) J^(k)`` with ``J^(k)`` the Jacobian of the first k
        inner steps, a product of one-step Jacobians (``InnerChain``). With ``structured`` and
        second-order steps whose step sizes are constants here (a scalar alpha, or learned step
        sizes that ``meta_params`` leaves out: their own optimizer updates them) this is
        computed from one-step products -- for one step, three backward passes (``J v`` through
        the inner gradient, the KL's Hessian in phi, ``J^T``) -- instead of differentiating
        through the gradient of the KL in theta, which would also form the third derivatives of
        the inner losses only to multiply them by that zero gradient. Otherwise (first-order
        steps, learned step sizes among ``meta_params``, or ``structured=False``) it is the
        plain double-backward product in ``meta_params``.
        """
        if value.kl is None:
            raise ValueError("kl_hessian_product needs a value with its KL (at_old_policy)")
        params = list(meta_params.values())
        inner = value.inner
        if not structured or inner is None or len(inner.steps[0].leaves) != len(params):
            grad_kl = torch.autograd.grad(value.kl, params, create_graph=True)

            def generic(vectors: list[Tensor]) -> list[Tensor]:
                dot = sum((g * v).sum() for g, v in zip(grad_kl, vectors))
                return list(torch.autograd.grad(dot, params, retain_graph=True,
                                                materialize_grads=True))

            return generic
        # The scored parameters are those after the last len(scored) inner steps.
        if len(value.kl_terms) != len(value.scored) or len(value.scored) > len(inner.steps):
            raise RuntimeError(f"{len(value.kl_terms)} KL terms for {len(value.scored)} scored "
                               f"parameter sets after {len(inner.steps)} inner steps")
        first = len(inner.steps) - len(value.scored)
        phis = [list(phi.values()) for phi in value.scored]
        grad_kl_phis = [torch.autograd.grad(term, phi, create_graph=True)
                        for term, phi in zip(value.kl_terms, phis)]

        def chained(vectors: list[Tensor]) -> list[Tensor]:
            per_task = [v.unsqueeze(0).expand_as(g)
                        for v, g in zip(vectors, inner.steps[0].grads)]
            jvs = inner.forward_products(per_task)
            fjvs: list[list[Tensor] | None] = [None] * first
            for grad_kl_phi, phi, jv in zip(grad_kl_phis, phis, jvs[first:]):
                fjvs.append(list(torch.autograd.grad(grad_kl_phi, phi, grad_outputs=jv,
                                                     retain_graph=True,
                                                     materialize_grads=True)))
            return [x.sum(0) for x in inner.transpose_product(fjvs)]

        return chained

    def kl_on_tasks(self, meta_params: Params, tasks: Tensor) -> Tensor:
        """Mean KL(old || new) over a subset of tasks (for subsampled Hessian-vector products)."""
        if self.old_dist is None:
            raise RuntimeError("kl_on_tasks needs set_old_policy() first")
        if self.batch.later:
            phis = self._scored_steps(adapt_policy_resampled(
                self.policy, meta_params, [e.select_tasks(tasks) for e in self.batch.inner_sets],
                self.step_size, self.first_order))
        else:
            phis = [adapt_policy(self.policy, meta_params, self.batch.pre.select_tasks(tasks),
                                 self.step_size, self.num_steps, self.first_order)[0]]
        kls = []
        for phi, s in zip(phis, self._scored):
            old = tuple(d.index_select(0, tasks) for d in s.old_dist)
            dist = self.policy.distribution(phi, s.obs.index_select(0, tasks))
            kls.append(masked_task_mean(self.policy.kl(old, dist),
                                        s.mask.index_select(0, tasks)).mean())
        return _mean(kls)
