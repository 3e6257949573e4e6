"""Inner adaptation: steps phi = theta - alpha * grad L_inner(theta), for all tasks at once.

The loss function maps *batched* parameters (a leading task dimension) to one loss per task.
The parameters theta are expanded over tasks, so a single backward pass of the summed loss gives
every task its own gradient. With ``create_graph`` the step stays differentiable (second-order
MAML); ``first_order`` treats the inner gradient as a constant. ``step_size`` is a number, or a
dict of per-parameter tensors (Meta-SGD), broadcast over tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from maml_core.allocator import tune_allocator
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
    # Task-major copies, made once: every evaluation of the loss reuses them.
    obs = episodes.task_major("observations").contiguous()
    actions = episodes.task_major("actions").contiguous()
    adv = episodes.task_major("advantages").contiguous()
    mask = episodes.task_major("masks").contiguous()

    def loss(params: Params) -> Tensor:
        return -masked_task_mean(log_prob(policy, params, obs, actions) * adv, mask)

    return loss


@dataclass
class InnerStep:
    """The differentiable inner step phi_i = theta - alpha * g_i(theta) of every task, kept so that
    products with its Jacobian can be formed by autograd (second-order MAML, one step, a scalar
    step size).

    The Jacobian of task i is J_i = I - alpha * H_i, with H_i the Hessian of the task's inner
    loss, which is symmetric: ``J_i w_i`` and ``J_i^T w_i`` are the same product, one backward
    pass through the inner gradient's graph for all tasks at once.
    """

    leaves: list[Tensor]  # theta expanded over tasks: the inputs of the inner gradient
    grads: list[Tensor]  # the inner gradients g_i(theta) [N, ...], with their graph
    step_size: float

    def jacobian_product(self, vectors: list[Tensor]) -> list[Tensor]:
        """``J_i w_i`` (= ``J_i^T w_i``) for per-task vectors ``w`` shaped like the gradients."""
        live = [i for i, g in enumerate(self.grads) if g.requires_grad]
        hw = torch.autograd.grad([self.grads[i] for i in live], self.leaves,
                                 grad_outputs=[vectors[i] for i in live], retain_graph=True,
                                 materialize_grads=True) if live else None
        if hw is None:  # an inner loss that is linear in theta
            return list(vectors)
        return [w - self.step_size * h for w, h in zip(vectors, hw)]


def adapt(params: Params, loss_fn: LossFn, step_size: float | Params, num_steps: int = 1,
          first_order: bool = False, num_tasks: int | None = None,
          create_graph: bool | None = None) -> tuple[Params, list[Tensor]]:
    """``num_steps`` gradient steps on ``loss_fn`` from ``params``, one set per task.

    ``params`` are shared (expanded over ``num_tasks``) or already batched (``num_tasks`` None).
    Returns the adapted batched parameters and the per-task inner loss before each step.
    The graph is kept (second order) when ``create_graph`` is true; by default it is kept
    whenever gradients are enabled, ``params`` require grad and ``first_order`` is off.
    """
    phi, losses, _ = adapt_with_inner_step(params, loss_fn, step_size, num_steps, first_order,
                                           num_tasks, create_graph)
    return phi, losses


def adapt_with_inner_step(params: Params, loss_fn: LossFn, step_size: float | Params,
                          num_steps: int = 1, first_order: bool = False,
                          num_tasks: int | None = None, create_graph: bool | None = None
                          ) -> tuple[Params, list[Tensor], InnerStep | None]:
    """``adapt``, also returning the differentiable ``InnerStep`` when there is exactly one
    second-order step with a scalar step size and the graph is kept (else None)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    tune_allocator()
    outer_grad = torch.is_grad_enabled() and any(v.requires_grad for v in params.values())
    if create_graph is None:
        create_graph = outer_grad and not first_order
    if not outer_grad:  # under no_grad, parameters that require grad are still constants
        params = {k: v.detach() for k, v in params.items()}
    phi = expand_to_tasks(params, num_tasks) if num_tasks is not None else dict(params)
    losses = []
    inner = None
    with torch.enable_grad():
        for _ in range(num_steps):
            leaves = {k: (v if v.requires_grad else v.detach().requires_grad_())
                      for k, v in phi.items()}
            task_losses = loss_fn(leaves)
            grads = torch.autograd.grad(task_losses.sum(), list(leaves.values()),
                                        create_graph=create_graph)
            losses.append(task_losses.detach())
            if (num_steps == 1 and create_graph and outer_grad and not first_order
                    and not isinstance(step_size, dict)):
                inner = InnerStep(list(leaves.values()), list(grads), float(step_size))
            phi = {}
            for (k, v), g in zip(leaves.items(), grads):
                if not create_graph:
                    g = g.detach()
                alpha = step_size[k] if isinstance(step_size, dict) else step_size
                phi[k] = v - alpha * g
    if not outer_grad:
        phi = {k: v.detach() for k, v in phi.items()}
    return phi, losses, inner


def inner_step_size(step_size: float | Params, step: int) -> float | Params:
    """The step size of inner step ``step`` (0-based) in the paper's protocol: alpha for the
    first step, alpha / 2 for every later one (learned per-weight sizes are halved alike)."""
    if step == 0:
        return step_size
    if isinstance(step_size, dict):
        return {k: v / 2 for k, v in step_size.items()}
    return step_size / 2


def adapt_policy_resampled(policy, meta_params: Params, episode_sets: list[Episodes],
                           step_size: float, first_order: bool = False,
                           create_graph: bool | None = None,
                           loss_fns: list[LossFn] | None = None) -> list[Params]:
    """Inner steps on fresh episodes: step k is one policy-gradient step on ``episode_sets[k]``
    (sampled with the policy of step k, theta for k = 0) with ``inner_step_size(alpha, k)``.
    Differentiable through every step (unless ``first_order``), as the evaluation adapts.
    Returns the adapted parameters after each step, the last one last.

    ``loss_fns`` may pass the prebuilt ``policy_gradient_loss`` of each set.
    """
    if not episode_sets:
        raise ValueError("adapt_policy_resampled needs at least one episode set")
    theta, learned = split_meta_params(meta_params)
    alpha = learned if learned is not None else step_size
    losses = loss_fns or [policy_gradient_loss(policy, e) for e in episode_sets]
    phi: Params = theta
    steps = []
    for k, (episodes, loss) in enumerate(zip(episode_sets, losses)):
        phi, _, _ = adapt_with_inner_step(phi, loss, inner_step_size(alpha, k), 1, first_order,
                                          num_tasks=episodes.num_tasks if k == 0 else None,
                                          create_graph=create_graph)
        steps.append(phi)
    return steps


def adapt_policy(policy, meta_params: Params, episodes: Episodes, step_size: float,
                 num_steps: int = 1, first_order: bool = False,
                 create_graph: bool | None = None) -> tuple[Params, list[Tensor]]:
    """Adapt the policy in ``meta_params`` to each task of ``episodes`` (the inner loop).

    Learned step sizes in ``meta_params`` (Meta-SGD) take the place of ``step_size``.
    """
    phi, losses, _ = adapt_policy_with_inner_step(policy, meta_params, episodes, step_size,
                                                  num_steps, first_order, create_graph)
    return phi, losses


def adapt_policy_with_inner_step(policy, meta_params: Params, episodes: Episodes,
                                 step_size: float, num_steps: int = 1, first_order: bool = False,
                                 create_graph: bool | None = None,
                                 loss_fn: LossFn | None = None
                                 ) -> tuple[Params, list[Tensor], InnerStep | None]:
    """``adapt_policy``, also returning the ``InnerStep`` (see ``adapt_with_inner_step``).

    ``loss_fn`` may pass a prebuilt ``policy_gradient_loss(policy, episodes)``.
    """
    theta, learned = split_meta_params(meta_params)
    return adapt_with_inner_step(theta, loss_fn or policy_gradient_loss(policy, episodes),
                                 learned if learned is not None else step_size, num_steps,
                                 first_order, num_tasks=episodes.num_tasks,
                                 create_graph=create_graph)
