"""Inner adaptation: steps phi = theta - alpha * grad L_inner(theta), for all tasks at once.

The loss function maps *batched* parameters (a leading task dimension) to one loss per task.
The parameters theta are expanded over tasks, so a single backward pass of the summed loss gives
every task its own gradient. With ``create_graph`` the step stays differentiable (second-order
MAML); ``first_order`` treats the inner gradient as a constant. ``step_size`` is a number, or a
dict of per-parameter tensors (Meta-SGD), broadcast over tasks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from maml_core.episodes import Episodes
from maml_core.policies import Params, log_prob

STEP_SIZE_PREFIX = "step_size."

LossFn = Callable[[Params], Tensor]


def expand_to_tasks(params: Params, num_tasks: int) -> Params:
    return {k: v.unsqueeze(0).expand(num_tasks, *v.shape) for k, v in params.items()}


def split_meta_params(meta_params: Params) -> tuple[Params, Params | None]:
    """Split meta-parameters into the policy's parameters and learned step sizes (if any)."""
    policy = {k: v for k, v in meta_params.items() if not k.startswith(STEP_SIZE_PREFIX)}
    sizes = {k[len(STEP_SIZE_PREFIX):]: v for k, v in meta_params.items()
             if k.startswith(STEP_SIZE_PREFIX)}
    return policy, (sizes or None)


def init_step_sizes(params: Params, value: float) -> Params:
    """Meta-SGD step sizes: one per weight, all starting at ``value``."""
    return {STEP_SIZE_PREFIX + k: torch.full_like(v, float(value)) for k, v in params.items()}


def masked_task_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over the valid entries of each task: [N, ...] -> [N]."""
    dims = tuple(range(1, x.dim()))
    return (x * mask).sum(dims) / mask.sum(dims).clamp(min=1.0)


def policy_gradient_loss(policy, episodes: Episodes) -> LossFn:
    """The REINFORCE loss -mean_t log pi(a_t|s_t) A_t of each task, for batched parameters."""
    if episodes.advantages is None:
        raise ValueError("episodes have no advantages; run advantages.process_episodes first")
    obs = episodes.task_major("observations")
    actions = episodes.task_major("actions")
    adv = episodes.task_major("advantages")
    mask = episodes.task_major("masks")

    def loss(params: Params) -> Tensor:
        return -masked_task_mean(log_prob(policy, params, obs, actions) * adv, mask)

    return loss


def adapt(params: Params, loss_fn: LossFn, step_size: float | Params, num_steps: int = 1,
          first_order: bool = False, num_tasks: int | None = None,
          create_graph: bool | None = None) -> tuple[Params, list[Tensor]]:
    """``num_steps`` gradient steps on ``loss_fn`` from ``params``, one set per task.

    ``params`` are shared (expanded over ``num_tasks``) or already batched (``num_tasks`` None).
    Returns the adapted batched parameters and the per-task inner loss before each step.
    The graph is kept (second order) when ``create_graph`` is true; by default it is kept
    whenever gradients are enabled, ``params`` require grad and ``first_order`` is off.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    outer_grad = torch.is_grad_enabled() and any(v.requires_grad for v in params.values())
    if create_graph is None:
        create_graph = outer_grad and not first_order
    phi = expand_to_tasks(params, num_tasks) if num_tasks is not None else dict(params)
    losses = []
    with torch.enable_grad():
        for _ in range(num_steps):
            leaves = {k: (v if v.requires_grad else v.detach().requires_grad_())
                      for k, v in phi.items()}
            task_losses = loss_fn(leaves)
            grads = torch.autograd.grad(task_losses.sum(), list(leaves.values()),
                                        create_graph=create_graph)
            losses.append(task_losses.detach())
            phi = {}
            for (k, v), g in zip(leaves.items(), grads):
                if not create_graph:
                    g = g.detach()
                alpha = step_size[k] if isinstance(step_size, dict) else step_size
                phi[k] = v - alpha * g
    if not outer_grad:
        phi = {k: v.detach() for k, v in phi.items()}
    return phi, losses


def adapt_policy(policy, meta_params: Params, episodes: Episodes, step_size: float,
                 num_steps: int = 1, first_order: bool = False,
                 create_graph: bool | None = None) -> tuple[Params, list[Tensor]]:
    """Adapt the policy in ``meta_params`` to each task of ``episodes`` (the inner loop).

    Learned step sizes in ``meta_params`` (Meta-SGD) take the place of ``step_size``.
    """
    theta, learned = split_meta_params(meta_params)
    return adapt(theta, policy_gradient_loss(policy, episodes),
                 learned if learned is not None else step_size, num_steps, first_order,
                 num_tasks=episodes.num_tasks, create_graph=create_graph)
