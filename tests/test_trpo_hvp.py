"""TRPO's fast paths: the KL Hessian-vector product through the inner steps (structured as
J^T (d^2 KL / d phi^2) J, J a chain of one-step Jacobians) against plain double backward and
finite differences, the fused old-policy evaluation, and conjugate gradient's accumulated H x."""

from __future__ import annotations

import pytest
import torch

from maml_core.config import build_config
from maml_core.optimizers import _conjugate_gradient, conjugate_gradient, flat, make_meta_optimizer
from maml_core.trainer import MetaLearner


def _objective(family="navigation2d", activation="tanh", **inner):
    config = build_config({"seed": 3, "dtype": "float64", "meta_batch_size": 3,
                           "episodes_per_task": 4, "iterations": 2,
                           "task": {"family": family, "horizon": 12},
                           "policy": {"hidden_sizes": [8], "activation": activation},
                           "inner": {"step_size": 0.5, **inner},
                           "meta_optimizer": {"name": "trpo"}})
    learner = MetaLearner(config)
    learner.step()  # move away from the initialization
    tasks = learner.sample_tasks(1)
    pre = learner.collect(learner.meta_params, tasks, 1, "pre")
    later, phi, _ = learner.adapt_all(pre, tasks, 1)
    post = learner.collect(phi, tasks, 1, "post")
    return learner, learner.objective(pre, post, tuple(later))


def _vectors(params, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def _assert_equals_double_backward(hvp, kl, params, seeds):
    """``hvp(v)`` is ``(d^2 kl / d params^2) v`` by plain double backward, for random ``v``."""
    grad_kl = torch.autograd.grad(kl, params, create_graph=True)
    for seed in seeds:
        v = _vectors(params, seed)
        dot = sum((g * x).sum() for g, x in zip(grad_kl, v))
        expected = flat(torch.autograd.grad(dot, params, retain_graph=True))
        got = flat(hvp(v))
        assert float((got - expected).norm() / expected.norm()) < 1e-10


# Several inner steps: on the same episodes, on fresh ones (the last one scored), and on fresh
# ones with every step scored (a KL term per step).
MULTI_STEP = [{"num_steps": 2},
              {"num_steps": 3, "step_size": 0.3, "fresh_episodes": True},
              {"num_steps": 2, "fresh_episodes": True, "every_step_objective": True},
              {"num_steps": 3, "step_size": 0.3, "fresh_episodes": True,
               "every_step_objective": True}]


@pytest.mark.parametrize("family,activation,inner",
                         [("navigation2d", "tanh", {}), ("navigation2d", "relu", {}),
                          ("tabular-mdp", "tanh", {}),
                          *(("navigation2d", "tanh", inner) for inner in MULTI_STEP),
                          ("navigation2d", "relu", MULTI_STEP[-2]),
                          ("tabular-mdp", "tanh", MULTI_STEP[-2])])
def test_structured_kl_hvp_equals_double_backward(family, activation, inner):
    learner, objective = _objective(family, activation, **inner)
    params = list(learner.meta_params.values())
    value = objective.at_old_policy(learner.meta_params)
    # the structured path is the one under test
    assert value.inner is not None
    assert len(value.inner.steps) == inner.get("num_steps", 1)
    hvp = objective.kl_hessian_product(learner.meta_params, value)
    assert hvp.__name__ == "chained"
    _assert_equals_double_backward(hvp, value.kl, params, seeds=range(3))
    learner.close()


@pytest.mark.parametrize("inner", [{}, MULTI_STEP[-2]])
def test_kl_hvp_matches_finite_differences_of_the_kl_gradient(inner):
    learner, objective = _objective(**inner)
    theta = {k: v.detach() for k, v in learner.meta_params.items()}
    value = objective.at_old_policy(learner.meta_params)
    hvp = objective.kl_hessian_product(learner.meta_params, value)
    v = _vectors(theta.values(), 7)

    def kl_grad(shift):
        leaves = {k: (t + shift * d).requires_grad_() for (k, t), d in zip(theta.items(), v)}
        kl = objective(leaves, kind="surrogate").kl
        return flat(torch.autograd.grad(kl, list(leaves.values())))

    eps = 1e-5
    fd = (kl_grad(eps) - kl_grad(-eps)) / (2 * eps)
    got = flat(hvp(v))
    assert float((got - fd).norm() / fd.norm()) < 1e-5
    learner.close()


# Inner steps without a chain of second-order steps (first-order); chained ones whose learned
# step sizes TRPO steps with the policy (the product differentiates through them); and chained
# ones for which plain double backward is asked.
@pytest.mark.parametrize("inner,has_chain,structured", [
    ({"first_order": True}, False, True), ({"learn_step_size": True}, True, True),
    ({"num_steps": 2, "fresh_episodes": True, "learn_step_size": True}, True, True),
    ({"num_steps": 2, "fresh_episodes": True, "first_order": True}, False, True),
    ({}, True, False), (MULTI_STEP[-2], True, False)])
def test_kl_hvp_falls_back_to_double_backward(inner, has_chain, structured):
    learner, objective = _objective(**inner)
    params = list(learner.meta_params.values())
    value = objective.at_old_policy(learner.meta_params)
    assert (value.inner is not None) == has_chain
    hvp = objective.kl_hessian_product(learner.meta_params, value, structured=structured)
    assert hvp.__name__ == "generic"
    grad_kl = torch.autograd.grad(value.kl, params, create_graph=True)
    v = _vectors(params, 1)
    dot = sum((g * x).sum() for g, x in zip(grad_kl, v))
    expected = flat(torch.autograd.grad(dot, params, retain_graph=True))
    torch.testing.assert_close(flat(hvp(v)), expected, rtol=1e-12, atol=1e-14)
    learner.close()


@pytest.mark.parametrize("kind", ["surrogate", "clipped"])
def test_at_old_policy_equals_set_old_policy_then_call(kind):
    learner, objective = _objective()
    params = list(learner.meta_params.values())
    fused = objective.at_old_policy(learner.meta_params, kind=kind)
    fused_old = objective.old_log_prob.clone()
    fused_grad = flat(torch.autograd.grad(fused.loss, params, retain_graph=True))
    objective.set_old_policy(learner.meta_params)
    torch.testing.assert_close(objective.old_log_prob, fused_old, rtol=1e-12, atol=1e-12)
    plain = objective(learner.meta_params, kind=kind, with_kl=True)
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fused.kl, plain.kl, rtol=1e-12, atol=1e-14)
    plain_grad = flat(torch.autograd.grad(plain.loss, params))
    torch.testing.assert_close(fused_grad, plain_grad, rtol=1e-10, atol=1e-14)
    learner.close()


def test_conjugate_gradient_returns_h_times_solution():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 12, generator=g, dtype=torch.float64)
    h = a @ a.T + 0.5 * torch.eye(12, dtype=torch.float64)
    b = torch.randn(12, generator=g, dtype=torch.float64)
    x, hx = _conjugate_gradient(lambda v: h @ v, b, iters=6)
    torch.testing.assert_close(hx, h @ x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(conjugate_gradient(lambda v: h @ v, b, iters=6), x)
    x_full, _ = _conjugate_gradient(lambda v: h @ v, b, iters=50)
    torch.testing.assert_close(h @ x_full, b, rtol=1e-8, atol=1e-8)


def _spread_step_sizes(learner, seed=5):
    """Distinct learned step sizes (per tensor, or per weight), so that D H and H D differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in learner.meta_params.items():
            if k.startswith("step_size."):
                v.copy_(0.1 + 0.4 * torch.rand(v.shape, generator=g, dtype=v.dtype))


@pytest.mark.parametrize("per", ["layer", "weight"])
@pytest.mark.parametrize("inner", [{}, MULTI_STEP[0], MULTI_STEP[1], MULTI_STEP[-1]])
def test_structured_kl_hvp_with_step_sizes_of_their_own(per, inner):
    """With ``step_size_lr`` TRPO steps the policy alone and the learned step sizes are constants
    of its Hessian: the chained product (A w = w - D H w, A^T w = w - H D w) equals double
    backward in the policy's parameters."""
    learner, objective = _objective(learn_step_size=True, step_size_per=per, step_size_lr=1e-3,
                                    **inner)
    _spread_step_sizes(learner)
    theta = learner.optimizer.trpo_params
    sizes = [v for k, v in learner.meta_params.items() if k.startswith("step_size.")]
    assert not any(k.startswith("step_size.") for k in theta) and len(theta) == len(sizes) == 5
    assert all(v.dim() == (0 if per == "layer" else v.dim()) for v in sizes)
    assert len({float(v.detach().flatten()[0]) for v in sizes}) == len(sizes)
    params = list(theta.values())
    value = objective.at_old_policy(learner.meta_params)
    hvp = objective.kl_hessian_product(theta, value)
    assert hvp.__name__ == "chained"
    _assert_equals_double_backward(hvp, value.kl, params, seeds=range(2))
    learner.close()


def _adam_first_step(learner, objective, lr):
    """Where the step sizes' own Adam, reset to a fresh state, will put them in its first
    step: lr * g / (|g| + eps) down the surrogate's gradient at the old policy."""
    sizes = {k: v for k, v in learner.meta_params.items() if k.startswith("step_size.")}
    value = objective.at_old_policy(learner.meta_params, kind="surrogate")
    grads = dict(zip(sizes, torch.autograd.grad(value.loss, list(sizes.values()))))
    learner.optimizer.size_optimizer.torch_optimizer.state.clear()
    return {k: v.detach() - lr * grads[k] / (grads[k].abs() + 1e-8) for k, v in sizes.items()}


def test_trpo_gives_step_sizes_an_adam_step_of_their_own():
    """TRPO's step moves the policy within max_kl; the step sizes move by Adam's first step,
    lr * g / (|g| + eps), on the surrogate's gradient at the old policy."""
    lr = 1e-3
    learner, objective = _objective(learn_step_size=True, step_size_per="layer",
                                    step_size_lr=lr)
    _spread_step_sizes(learner)
    sizes = {k: v for k, v in learner.meta_params.items() if k.startswith("step_size.")}
    before = {k: v.detach().clone() for k, v in learner.meta_params.items()}
    expected = _adam_first_step(learner, objective, lr)
    stats = learner.optimizer.step(objective)
    assert stats["rejected"] == 0.0 and stats["kl"] <= learner.config.meta_optimizer.max_kl
    for k, v in learner.meta_params.items():
        if k in sizes:
            torch.testing.assert_close(v.detach(), expected[k], rtol=0, atol=1e-12)
            assert abs(float(v.detach() - before[k])) > 0.9 * lr
        else:
            assert not torch.equal(v.detach(), before[k])  # TRPO moved the policy
    assert stats["step_size_min"] == min(float(v.detach()) for v in sizes.values())
    # and the optimizer state round-trips (the checkpoint's tensors and JSON)
    tensors, meta = learner.optimizer.state_dict()
    assert tensors and all(k.startswith("step_size_adam.") for k in tensors)
    other, _ = _objective(learn_step_size=True, step_size_per="layer", step_size_lr=lr)
    other.optimizer.load_state_dict(tensors, meta)
    again, _ = other.optimizer.state_dict()
    assert tensors.keys() == again.keys()
    assert all(torch.equal(tensors[k], again[k]) for k in tensors)
    learner.close()
    other.close()


def test_step_size_floor_projects_the_adam_step():
    """With ``step_size_min`` the sizes' Adam step is clamped from below: a size whose step
    lands under the floor sits on it, the others move as Adam's first step alone moves them."""
    lr, floor = 1e-3, 0.3
    learner, objective = _objective(learn_step_size=True, step_size_per="layer",
                                    step_size_lr=lr, step_size_min=floor)
    _spread_step_sizes(learner)
    sizes = {k: v for k, v in learner.meta_params.items() if k.startswith("step_size.")}
    unfloored = _adam_first_step(learner, objective, lr)
    assert min(map(float, unfloored.values())) < floor < max(map(float, unfloored.values()))
    stats = learner.optimizer.step(objective)
    for k, v in sizes.items():
        torch.testing.assert_close(v.detach(), unfloored[k].clamp(min=floor), rtol=0, atol=1e-12)
    assert stats["step_size_min"] == floor
    learner.close()


def test_step_size_floor_needs_its_own_optimizer():
    config = build_config({"policy": {"hidden_sizes": [8]}, "inner": {"learn_step_size": True},
                           "meta_optimizer": {"name": "trpo"}})
    learner = MetaLearner(config)
    with pytest.raises(ValueError, match=r"step_size_min floors .* give step_size_lr with it"):
        make_meta_optimizer(learner.meta_params, config.meta_optimizer, None, 0.0)
    learner.close()
