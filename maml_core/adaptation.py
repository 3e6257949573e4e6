"""Inner adaptation: steps phi = theta - alpha * grad L_inner(theta), for all tasks at once.

The loss function maps *batched* parameters (a leading task dimension) to one loss per task.
The parameters theta are expanded over tasks, so a single backward pass of the summed loss gives
every task its own gradient. With ``create_graph`` the step stays differentiable (second-order
MAML); ``first_order`` treats the inner gradient as a constant. ``step_size`` is a number, or a
dict of learned step sizes (Meta-SGD): per parameter tensor, one per weight or one scalar for the
whole tensor (per layer), broadcast over tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from maml_core.allocator import tune_allocator
from maml_core.config import PAPER_LATER_STEP_SCALE
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


def init_step_sizes(params: Params, value: float, per: str = "weight") -> Params:
    """Meta-SGD step sizes, all starting at ``value``: one per weight (``per="weight"``), or one
    scalar per parameter tensor (``per="layer"``)."""
    if per not in ("weight", "layer"):
        raise ValueError(f"step sizes are learned per 'weight' or per 'layer', not {per!r}")
    return {STEP_SIZE_PREFIX + k: (torch.full_like(v, float(value)) if per == "weight"
                                   else torch.tensor(float(value), dtype=v.dtype,
                                                     device=v.device))
            for k, v in params.items()}


def masked_task_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over the valid entries of each task: [N, ...] -> [N]."""
    dims = tuple(range(1, x.dim()))
    return (x * mask).sum(dims) / mask.sum(dims).clamp(min=1.0)


def policy_gradient_loss(policy, episodes: Episodes) -> LossFn:
    """The REINFORCE loss -mean_t log pi(a_t|s_t) A_t of each task, for batched parameters."""
    if episodes.advantages is None:
        raise ValueError("episodes have no advantages; run advantages.process_episodes first")
    # Task-major copies, made once: every evaluation of the loss reuses them.
    return policy_gradient_loss_on(policy, *task_major_tensors(episodes))


def task_major_tensors(episodes: Episodes) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Contiguous task-major copies of the observations, actions, advantages and masks."""
    return tuple(episodes.task_major(k).contiguous()
                 for k in ("observations", "actions", "advantages", "masks"))


def policy_gradient_loss_on(policy, obs: Tensor, actions: Tensor, adv: Tensor,
                            mask: Tensor) -> LossFn:
    """``policy_gradient_loss`` on task-major tensors already made."""

    def loss(params: Params) -> Tensor:
        return -masked_task_mean(log_prob(policy, params, obs, actions) * adv, mask)

    return loss


@dataclass
class InnerStep:
    """One differentiable inner step phi_i = p_i - D g_i(p_i) of every task, kept so that products
    with its Jacobian can be formed by autograd (second-order MAML). ``p`` is theta expanded over
    tasks for the first step, the previous step's result after it. D is the step size: a scalar
    alpha, or learned step sizes (per weight or per tensor), taken here as constants.

    Its Jacobian for task i is A_i = I - D H_i, with H_i the Hessian of the task's inner loss at
    p_i (a function of p_i alone, and symmetric), so ``A_i w_i = w_i - D (H_i w_i)`` and
    ``A_i^T w_i = w_i - H_i (D w_i)``: one backward pass through the inner gradient's graph for
    all tasks at once, either way (with a scalar alpha the two are the same product). That pass
    stops at ``p``: it does not run through the steps before.
    """

    leaves: list[Tensor]  # p: the inputs of the inner gradient, [N, ...] per parameter
    grads: list[Tensor]  # the inner gradients g_i(p_i) [N, ...], with their graph
    step_size: float | list[Tensor]  # alpha, or one (detached) step-size tensor per parameter

    def _scaled(self, vectors: list[Tensor]) -> list[Tensor]:
        if isinstance(self.step_size, float):
            return [self.step_size * v for v in vectors]
        return [a * v for a, v in zip(self.step_size, vectors)]

    def jacobian_product(self, vectors: list[Tensor], transpose: bool = False) -> list[Tensor]:
        """``A_i w_i`` (``A_i^T w_i`` with ``transpose``) for per-task vectors ``w`` shaped like
        the gradients."""
        scale_first = transpose and not isinstance(self.step_size, float)
        inputs = self._scaled(vectors) if scale_first else vectors
        live = [i for i, g in enumerate(self.grads) if g.requires_grad]
        hw = torch.autograd.grad([self.grads[i] for i in live], self.leaves,
                                 grad_outputs=[inputs[i] for i in live], retain_graph=True,
                                 materialize_grads=True) if live else None
        if hw is None:  # an inner loss that is linear in theta
            return list(vectors)
        return [w - h for w, h in zip(vectors, hw if scale_first else self._scaled(hw))]


@dataclass
class InnerChain:
    """The differentiable inner steps 1..K in order (``InnerStep``): phi_k = f_k(phi_{k-1}) with
    phi_0 theta expanded over tasks. The Jacobian of phi_k in theta is J^(k) = A_k ... A_1, A_k
    the Jacobian of step k, so its products are chains of one-step products."""

    steps: list[InnerStep]

    def forward_products(self, vectors: list[Tensor]) -> list[list[Tensor]]:
        """``[J^(1) v, ..., J^(K) v]`` for per-task vectors ``v`` shaped like theta expanded."""
        out = []
        for step in self.steps:
            vectors = step.jacobian_product(vectors)
            out.append(vectors)
        return out

    def transpose_product(self, vectors: list[list[Tensor] | None]) -> list[Tensor]:
        """``sum_k J^(k)^T w_k`` for ``vectors[k - 1] = w_k`` (per task, shaped like phi_k; None
        for a step that contributes nothing), as A_1 (w_1 + A_2 (w_2 + ... A_K w_K)): one
        one-step product per step."""
        if len(vectors) != len(self.steps) or vectors[-1] is None:
            raise ValueError("transpose_product needs one vector set per inner step, the last "
                             "one given")
        total: list[Tensor] | None = None
        for step, w in zip(reversed(self.steps), reversed(vectors)):
            if w is not None:
                total = list(w) if total is None else [t + x for t, x in zip(total, w)]
            total = step.jacobian_product(total, transpose=True)
        return total


def adapt(params: Params, loss_fn: LossFn, step_size: float | Params, num_steps: int = 1,
          first_order: bool = False, num_tasks: int | None = None,
          create_graph: bool | None = None) -> tuple[Params, list[Tensor]]:
    """``num_steps`` gradient steps on ``loss_fn`` from ``params``, one set per task.

    ``params`` are shared (expanded over ``num_tasks``) or already batched (``num_tasks`` None).
    Returns the adapted batched parameters and the per-task inner loss before each step.
    The graph is kept (second order) when ``create_graph`` is true; by default it is kept
    whenever gradients are enabled, ``params`` require grad and ``first_order`` is off.
    """
    phi, losses, _ = adapt_with_inner_steps(params, loss_fn, step_size, num_steps, first_order,
                                            num_tasks, create_graph)
    return phi, losses


def adapt_with_inner_steps(params: Params, loss_fn: LossFn, step_size: float | Params,
                           num_steps: int = 1, first_order: bool = False,
                           num_tasks: int | None = None, create_graph: bool | None = None
                           ) -> tuple[Params, list[Tensor], InnerChain | None]:
    """``adapt``, also returning the differentiable steps (``InnerChain``, one ``InnerStep`` per
    step) when they are second-order and the graph is kept (else None)."""
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
    structured = create_graph and outer_grad and not first_order
    inner_steps = []
    with torch.enable_grad():
        for _ in range(num_steps):
            leaves = {k: (v if v.requires_grad else v.detach().requires_grad_())
                      for k, v in phi.items()}
            task_losses = loss_fn(leaves)
            grads = torch.autograd.grad(task_losses.sum(), list(leaves.values()),
                                        create_graph=create_graph)
            losses.append(task_losses.detach())
            if structured:
                sizes = ([step_size[k].detach() for k in leaves] if isinstance(step_size, dict)
                         else float(step_size))
                inner_steps.append(InnerStep(list(leaves.values()), list(grads), sizes))
            phi = {}
            for (k, v), g in zip(leaves.items(), grads):
                if not create_graph:
                    g = g.detach()
                alpha = step_size[k] if isinstance(step_size, dict) else step_size
                phi[k] = v - alpha * g
    if not outer_grad:
        phi = {k: v.detach() for k, v in phi.items()}
    return phi, losses, (InnerChain(inner_steps) if structured else None)


def inner_step_size(step_size: float | Params, step: int,
                    later_scale: float = PAPER_LATER_STEP_SCALE) -> float | Params:
    """The step size of inner step ``step`` (0-based): alpha for the first step,
    ``later_scale`` * alpha for every later one (learned per-weight sizes are scaled alike).
    The default 0.5 is the paper's protocol (alpha / 2)."""
    if step == 0:
        return step_size
    if isinstance(step_size, dict):
        return {k: v * later_scale for k, v in step_size.items()}
    return step_size * later_scale


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
    return adapt_policy_resampled_with_inner_steps(policy, meta_params, episode_sets, step_size,
                                                   first_order, create_graph, loss_fns)[0]


def adapt_policy_resampled_with_inner_steps(
        policy, meta_params: Params, episode_sets: list[Episodes], step_size: float,
        first_order: bool = False, create_graph: bool | None = None,
        loss_fns: list[LossFn] | None = None) -> tuple[list[Params], InnerChain | None]:
    """``adapt_policy_resampled``, also returning its differentiable steps (``InnerChain``; None
    unless every step is second-order and the graph is kept)."""
    if not episode_sets:
        raise ValueError("adapt_policy_resampled needs at least one episode set")
    theta, learned = split_meta_params(meta_params)
    alpha = learned if learned is not None else step_size
    losses = loss_fns or [policy_gradient_loss(policy, e) for e in episode_sets]
    phi: Params = theta
    steps: list[Params] = []
    inner_steps: list[InnerStep] = []
    structured = True  # every step so far second-order
    for k, (episodes, loss) in enumerate(zip(episode_sets, losses)):
        phi, _, chain = adapt_with_inner_steps(phi, loss, inner_step_size(alpha, k), 1,
                                               first_order,
                                               num_tasks=episodes.num_tasks if k == 0 else None,
                                               create_graph=create_graph)
        steps.append(phi)
        if chain is None:
            structured = False
        else:
            inner_steps += chain.steps
    return steps, (InnerChain(inner_steps) if structured else None)


def adapt_policy(policy, meta_params: Params, episodes: Episodes, step_size: float,
                 num_steps: int = 1, first_order: bool = False,
                 create_graph: bool | None = None) -> tuple[Params, list[Tensor]]:
    """Adapt the policy in ``meta_params`` to each task of ``episodes`` (the inner loop).

    Learned step sizes in ``meta_params`` (Meta-SGD) take the place of ``step_size``.
    """
    phi, losses, _ = adapt_policy_with_inner_steps(policy, meta_params, episodes, step_size,
                                                   num_steps, first_order, create_graph)
    return phi, losses


def adapt_policy_with_inner_steps(policy, meta_params: Params, episodes: Episodes,
                                  step_size: float, num_steps: int = 1,
                                  first_order: bool = False, create_graph: bool | None = None,
                                  loss_fn: LossFn | None = None
                                  ) -> tuple[Params, list[Tensor], InnerChain | None]:
    """``adapt_policy``, also returning the ``InnerChain`` (see ``adapt_with_inner_steps``).

    ``loss_fn`` may pass a prebuilt ``policy_gradient_loss(policy, episodes)``.
    """
    theta, learned = split_meta_params(meta_params)
    return adapt_with_inner_steps(theta, loss_fn or policy_gradient_loss(policy, episodes),
                                  learned if learned is not None else step_size, num_steps,
                                  first_order, num_tasks=episodes.num_tasks,
                                  create_graph=create_graph)
