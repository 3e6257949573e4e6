"""The meta-gradient: second order against finite differences, first order against a detached
inner gradient, Meta-SGD step sizes, and the adapted parameters used for sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.distributions import Normal

from maml_core.adaptation import STEP_SIZE_PREFIX, adapt_policy, init_step_sizes, split_meta_params
from maml_core.advantages import process_episodes
from maml_core.config import build_config
from maml_core.meta_objective import MetaBatch, MetaObjective
from maml_core.policies import GaussianMLPPolicy
from maml_core.rollouts import collect_episodes
from maml_core.seeding import generator
from maml_core.tasks.navigation import Navigation2D
from maml_core.trainer import MetaLearner

torch.set_num_threads(1)

DTYPE = torch.float64
ALPHA = 0.5  # large enough that the second-order term is far from negligible


def _policy(seed: int = 0) -> GaussianMLPPolicy:
    policy = GaussianMLPPolicy(2, 2, hidden_sizes=[8]).to(DTYPE)
    policy.reset_parameters(generator(seed))
    with torch.no_grad():  # non-trivial biases and std, so that every parameter matters
        g = generator(seed + 1)
        for layer in policy.layers:
            layer.bias.copy_(0.3 * torch.randn(layer.bias.shape, generator=g, dtype=DTYPE))
        policy.log_std.copy_(torch.tensor([-0.4, 0.2], dtype=DTYPE))
    return policy


def _episodes(policy, params, seeds, tasks, episodes_per_task=4):
    env = Navigation2D().make_env(tasks, episodes_per_task, horizon=12, dtype=DTYPE)
    episodes = collect_episodes(env, policy, params, seeds)
    # Cut some episodes short by hand so that the masked paths are exercised too.
    masks = episodes.masks.clone()
    masks[5:, 0, 1] = 0.0
    masks[9:, 2, 3] = 0.0
    episodes.masks = masks
    episodes.rewards = episodes.rewards * masks
    return process_episodes(episodes, gamma=0.99, gae_lambda=0.95)


@pytest.fixture(scope="module")
def setup():
    policy = _policy()
    theta = policy.params()
    tasks = Navigation2D().sample_tasks(3, np.random.default_rng(5))
    pre = _episodes(policy, theta, [11, 12, 13], tasks)
    with torch.no_grad():
        phi, _ = adapt_policy(policy, theta, pre, ALPHA)
    post = _episodes(policy, phi, [21, 22, 23], tasks)
    return policy, theta, pre, post


def _flatten(params):
    return torch.cat([v.reshape(-1) for v in params.values()])


def _unflatten(vector, like):
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vector[i:i + v.numel()].view_as(v)
        i += v.numel()
    return out


def _grad(objective, params):
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    loss = objective(leaves, kind="pg").loss
    return _flatten(dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())))))


def _finite_differences(objective, params, eps=1e-6):
    x0 = _flatten(params).detach()
    out = torch.empty_like(x0)
    for i in range(x0.numel()):
        values = []
        for sign in (1.0, -1.0):
            x = x0.clone()
            x[i] += sign * eps
            with torch.no_grad():
                values.append(float(objective(_unflatten(x, params), kind="pg").loss))
        out[i] = (values[0] - values[1]) / (2 * eps)
    return out


def _rel_err(a, b):
    return float((a - b).norm() / b.norm())


def _task_pg_losses(policy, episodes, phi):
    """-mean_t log pi(a|s) A per task, written independently of the library: one
    ``functional_call`` per task and ``torch.distributions.Normal`` for the log-likelihood."""
    losses = []
    for i in range(episodes.num_tasks):
        params_i = {k: v[i] for k, v in phi.items()}
        obs = episodes.observations[:, i]
        mean = torch.func.functional_call(policy, params_i, (obs,))
        lp = Normal(mean, params_i["log_std"].exp()).log_prob(episodes.actions[:, i]).sum(-1)
        mask = episodes.masks[:, i]
        losses.append(-(lp * episodes.advantages[:, i] * mask).sum() / mask.sum())
    return torch.stack(losses)


def _reference_gradient(policy, pre, post, theta, num_steps, first_order):
    leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
    n = pre.num_tasks
    phi = {k: v.unsqueeze(0).expand(n, *v.shape) for k, v in leaves.items()}
    for _ in range(num_steps):
        inner = _task_pg_losses(policy, pre, phi).sum()
        grads = torch.autograd.grad(inner, list(phi.values()), create_graph=not first_order,
                                    retain_graph=True)
        if first_order:
            grads = [g.detach() for g in grads]
        phi = {k: v - ALPHA * g for (k, v), g in zip(phi.items(), grads)}
    outer = _task_pg_losses(policy, post, phi).mean()
    return _flatten(dict(zip(leaves, torch.autograd.grad(outer, list(leaves.values())))))


@pytest.mark.parametrize("num_steps", [1, 2])
def test_second_order_meta_gradient_matches_finite_differences(setup, num_steps):
    policy, theta, pre, post = setup
    objective = MetaObjective(policy, MetaBatch(pre, post), ALPHA, num_steps)
    grad = _grad(objective, theta)
    fd = _finite_differences(objective, theta)
    assert grad.numel() == 44 and bool(torch.all(fd != 0))
    assert _rel_err(grad, fd) < 1e-3
    # An independent implementation of the same second-order gradient agrees too.
    ref = _reference_gradient(policy, pre, post, theta, num_steps, first_order=False)
    assert _rel_err(grad, ref) < 1e-10
    # The second-order term matters here, so the comparison above is a real check.
    first = _grad(MetaObjective(policy, MetaBatch(pre, post), ALPHA, num_steps,
                                first_order=True), theta)
    assert _rel_err(first, fd) > 1e-2


def test_meta_gradient_with_more_inner_than_outer_episodes_matches_finite_differences(setup):
    # inner.episodes_per_task: the inner step adapts on 6 episodes per task, the meta-loss
    # scores 4; each task's inner loss averages over its own 6.
    policy, theta, _, post = setup
    tasks = Navigation2D().sample_tasks(3, np.random.default_rng(5))
    pre = _episodes(policy, theta, [31, 32, 33], tasks, episodes_per_task=6)
    assert (pre.episodes_per_task, post.episodes_per_task) == (6, 4)
    objective = MetaObjective(policy, MetaBatch(pre, post), ALPHA, 1)
    grad = _grad(objective, theta)
    assert _rel_err(grad, _finite_differences(objective, theta)) < 1e-3
    ref = _reference_gradient(policy, pre, post, theta, 1, first_order=False)
    assert _rel_err(grad, ref) < 1e-10


@pytest.mark.parametrize("num_steps", [1, 2])
def test_first_order_meta_gradient_detaches_the_inner_gradient(setup, num_steps):
    policy, theta, pre, post = setup
    objective = MetaObjective(policy, MetaBatch(pre, post), ALPHA, num_steps, first_order=True)
    grad = _grad(objective, theta)
    ref = _reference_gradient(policy, pre, post, theta, num_steps, first_order=True)
    assert _rel_err(grad, ref) < 1e-10


@pytest.mark.parametrize("num_steps", [1, 2])
def test_meta_sgd_step_size_gradient_matches_finite_differences(setup, num_steps):
    policy, theta, pre, post = setup
    meta = {**theta, **init_step_sizes(theta, ALPHA)}
    g = generator(3)
    for k in meta:  # distinct step sizes per weight
        if k.startswith("step_size."):
            meta[k] = meta[k] * (0.5 + torch.rand(meta[k].shape, generator=g, dtype=DTYPE))
    # step_size=123 must be ignored when step sizes are learned.
    objective = MetaObjective(policy, MetaBatch(pre, post), 123.0, num_steps)
    grad = _grad(objective, meta)
    fd = _finite_differences(objective, meta)
    n_theta = _flatten(theta).numel()
    assert grad.numel() == 2 * n_theta
    assert _rel_err(grad[n_theta:], fd[n_theta:]) < 1e-3  # the step sizes
    assert _rel_err(grad, fd) < 1e-3
    assert float(grad[n_theta:].norm()) > 0


# ------------------------------------------------------------- adapted parameters


def _learner(optimizer=None, **inner):
    config = build_config({"seed": 4, "dtype": "float64", "meta_batch_size": 3,
                           "episodes_per_task": 4, "task": {"family": "navigation2d",
                                                            "horizon": 15},
                           "policy": {"hidden_sizes": [8]}, "inner": inner,
                           "meta_optimizer": optimizer or {"name": "adam"}})
    return MetaLearner(config)


@pytest.mark.parametrize("inner", [{"num_steps": 1}, {"num_steps": 2},
                                   {"num_steps": 1, "learn_step_size": True},
                                   {"num_steps": 1, "learn_step_size": True,
                                    "step_size_per": "layer"},
                                   {"num_steps": 2, "first_order": True},
                                   {"num_steps": 1, "episodes_per_task": 6}])
def test_adapted_parameters_match_meta_objective(inner):
    learner = _learner(step_size=0.3, **inner)
    tasks = learner.sample_tasks(0)
    pre = learner.collect(learner.meta_params, tasks, 0, "pre")
    phi = learner.adapt(pre)
    post = learner.collect(phi, tasks, 0, "post")
    assert (pre.episodes_per_task, post.episodes_per_task) == (inner.get("episodes_per_task", 4),
                                                               4)
    value = learner.objective(pre, post)(learner.meta_params)
    assert set(value.adapted) == set(phi)
    for k, v in phi.items():
        assert not v.requires_grad and v.shape == (3, *learner.policy.get_parameter(k).shape)
        torch.testing.assert_close(value.adapted[k].detach(), v, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        detached = {k: v.detach() for k, v in learner.meta_params.items()}
        again, _ = adapt_policy(learner.policy, detached, pre,
                                learner.config.inner.step_size, inner["num_steps"],
                                inner.get("first_order", False))
    for k, v in phi.items():
        torch.testing.assert_close(again[k], v, rtol=1e-12, atol=1e-12)
    # One step by hand: phi = theta - alpha * grad of the task's own inner loss.
    if inner["num_steps"] == 1:
        theta, sizes = split_meta_params({k: v.detach() for k, v in learner.meta_params.items()})
        leaves = {k: v.unsqueeze(0).expand(3, *v.shape).clone().requires_grad_()
                  for k, v in theta.items()}
        grads = torch.autograd.grad(_task_pg_losses(learner.policy, pre, leaves).sum(),
                                    list(leaves.values()))
        for (k, v), g in zip(leaves.items(), grads):
            alpha = sizes[k] if sizes is not None else 0.3
            torch.testing.assert_close(phi[k], v.detach() - alpha * g, rtol=1e-10, atol=1e-12)
            assert not torch.equal(phi[k][0], phi[k][1])  # each task adapts on its own data
    learner.close()


def test_adapt_policy_under_no_grad_accepts_trainable_meta_params():
    learner = _learner(step_size=0.3)
    tasks = learner.sample_tasks(0)
    pre = learner.collect(learner.meta_params, tasks, 0, "pre")
    expected = learner.adapt(pre)
    with torch.no_grad():
        phi, _ = adapt_policy(learner.policy, learner.meta_params, pre, 0.3)
    for k, v in expected.items():
        torch.testing.assert_close(phi[k], v, rtol=1e-12, atol=1e-12)
    learner.close()



# ------------------------------------------------------ inner steps on fresh episodes


def _reference_fresh_adapt(policy, theta, inner_sets, first_order=False, alpha0=ALPHA):
    """phi_1 = theta - alpha g(pre; theta), phi_{k+1} = phi_k - alpha / 2 g(set k; phi_k),
    written with the library-independent per-task loss."""
    n = inner_sets[0].num_tasks
    phi = {k: v.unsqueeze(0).expand(n, *v.shape) for k, v in theta.items()}
    for step, episodes in enumerate(inner_sets):
        if not any(v.requires_grad for v in phi.values()):
            phi = {k: v.detach().requires_grad_() for k, v in phi.items()}
        grads = torch.autograd.grad(_task_pg_losses(policy, episodes, phi).sum(),
                                    list(phi.values()), create_graph=not first_order)
        alpha = alpha0 if step == 0 else alpha0 / 2
        phi = {k: v - alpha * (g.detach() if first_order else g)
               for (k, v), g in zip(phi.items(), grads)}
    return phi


@pytest.fixture(scope="module")
def fresh_setup(setup):
    """pre (sampled with theta), mid (with phi_1) and post (with phi_2): the episodes of two
    inner steps on fresh episodes."""
    policy, theta, pre, _ = setup
    tasks = Navigation2D().sample_tasks(3, np.random.default_rng(5))
    phi1 = {k: v.detach() for k, v in _reference_fresh_adapt(policy, theta, [pre]).items()}
    mid = _episodes(policy, phi1, [31, 32, 33], tasks)
    phi2 = {k: v.detach() for k, v in _reference_fresh_adapt(policy, theta, [pre, mid]).items()}
    post = _episodes(policy, phi2, [41, 42, 43], tasks)
    return policy, theta, pre, mid, post


def test_fresh_episode_meta_gradient_goes_through_both_steps(fresh_setup):
    policy, theta, pre, mid, post = fresh_setup
    objective = MetaObjective(policy, MetaBatch(pre, post, (mid,)), ALPHA, 2)
    grad = _grad(objective, theta)
    fd = _finite_differences(objective, theta)
    assert _rel_err(grad, fd) < 1e-3
    leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
    outer = _task_pg_losses(policy, post, _reference_fresh_adapt(policy, leaves,
                                                                 [pre, mid])).mean()
    ref = _flatten(dict(zip(leaves, torch.autograd.grad(outer, list(leaves.values())))))
    assert _rel_err(grad, ref) < 1e-10
    # The second step's episodes matter: reusing pre for it is another objective.
    reused = _grad(MetaObjective(policy, MetaBatch(pre, post), ALPHA, 2), theta)
    assert _rel_err(reused, grad) > 1e-2
    # First order detaches both inner gradients.
    first = _grad(MetaObjective(policy, MetaBatch(pre, post, (mid,)), ALPHA, 2,
                                first_order=True), theta)
    leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
    outer = _task_pg_losses(policy, post, _reference_fresh_adapt(policy, leaves, [pre, mid],
                                                                 first_order=True)).mean()
    ref_first = _flatten(dict(zip(leaves, torch.autograd.grad(outer, list(leaves.values())))))
    assert _rel_err(first, ref_first) < 1e-10 and _rel_err(first, fd) > 1e-2


def test_fresh_episode_batch_needs_one_set_per_later_step(fresh_setup):
    policy, _, pre, mid, post = fresh_setup
    with pytest.raises(ValueError, match="3 inner steps on fresh episodes need 2"):
        MetaObjective(policy, MetaBatch(pre, post, (mid,)), ALPHA, 3)


def test_every_step_objective_is_the_mean_of_the_one_and_two_step_objectives(fresh_setup):
    policy, theta, pre, mid, post = fresh_setup
    every = MetaObjective(policy, MetaBatch(pre, post, (mid,)), ALPHA, 2, every_step=True)
    # The policy after one step is scored on mid (the episodes it sampled), the policy after
    # two on post: each term written apart with the library-independent loss.
    leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
    one = _task_pg_losses(policy, mid, _reference_fresh_adapt(policy, leaves, [pre]))
    two = _task_pg_losses(policy, post, _reference_fresh_adapt(policy, leaves, [pre, mid]))
    ref_loss = (one.mean() + two.mean()) / 2
    value = every(theta)
    torch.testing.assert_close(value.task_losses, ((one + two) / 2).detach(), rtol=1e-10,
                               atol=1e-12)
    ref = _flatten(dict(zip(leaves, torch.autograd.grad(ref_loss, list(leaves.values())))))
    grad = _grad(every, theta)
    assert _rel_err(grad, ref) < 1e-10
    assert _rel_err(grad, _finite_differences(every, theta)) < 1e-3
    last = _grad(MetaObjective(policy, MetaBatch(pre, post, (mid,)), ALPHA, 2), theta)
    assert _rel_err(grad, last) > 1e-2
    # TRPO's surrogate and KL: at the old policies the surrogate's gradient is the policy
    # gradient's, and the KL (the mean of both steps' KLs) is zero; moved, it is the mean of
    # the KLs of the one- and two-step objectives on their own episodes.
    at_old = every.at_old_policy(theta)
    assert float(at_old.kl) == pytest.approx(0.0, abs=1e-12)
    leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
    surrogate_grad = torch.autograd.grad(every(leaves, kind="surrogate").loss,
                                         list(leaves.values()))
    assert _rel_err(_flatten(dict(zip(leaves, surrogate_grad))), grad) < 1e-10
    moved = {k: v + 0.01 * torch.ones_like(v) for k, v in theta.items()}
    singles = []
    for batch, steps in ((MetaBatch(pre, mid), 1), (MetaBatch(pre, post, (mid,)), 2)):
        single = MetaObjective(policy, batch, ALPHA, steps)
        single.set_old_policy(theta)
        singles.append(single(moved, kind="surrogate"))
    both = every(moved, kind="surrogate")
    torch.testing.assert_close(both.kl, (singles[0].kl + singles[1].kl) / 2, rtol=1e-10,
                               atol=1e-14)
    torch.testing.assert_close(both.loss, (singles[0].loss + singles[1].loss) / 2,
                               rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(every.kl_on_tasks(moved, torch.arange(3)), both.kl, rtol=1e-10,
                               atol=1e-14)
    subset = torch.tensor([0, 2])  # each set's tasks are picked alike
    sub_kls = []
    for batch, steps in ((MetaBatch(pre, mid), 1), (MetaBatch(pre, post, (mid,)), 2)):
        single = MetaObjective(policy, batch, ALPHA, steps)
        single.set_old_policy(theta)
        sub_kls.append(single.kl_on_tasks(moved, subset))
    torch.testing.assert_close(every.kl_on_tasks(moved, subset), (sub_kls[0] + sub_kls[1]) / 2,
                               rtol=1e-10, atol=1e-14)
    assert float(both.kl) > 0
    with pytest.raises(ValueError, match="needs inner steps on fresh episodes"):
        MetaObjective(policy, MetaBatch(pre, post), ALPHA, 2, every_step=True)


def test_learner_with_fresh_episodes_samples_each_inner_step_anew():
    learner = _learner(step_size=0.3, num_steps=3, fresh_episodes=True)
    assert learner.later_phases == ["pre1", "pre2"]
    tasks = learner.sample_tasks(0)
    sets = [learner.collect(learner.meta_params, tasks, 0, "pre")]
    phi = learner.adapt(sets[0])
    for step, phase in enumerate(learner.later_phases, start=1):
        sets.append(learner.collect(phi, tasks, 0, phase))
        phi = learner.adapt_further(sets[-1], phi, step)
    assert not torch.equal(sets[1].actions, sets[0].actions)
    # The sampling path (no graph), the meta-objective's differentiable path and a
    # reference written apart agree: alpha, then alpha / 2 twice, as the evaluation adapts.
    post = learner.collect(phi, tasks, 0, "post")
    value = learner.objective(sets[0], post, tuple(sets[1:]))(learner.meta_params)
    theta = {k: v.detach() for k, v in learner.meta_params.items()}
    ref = _reference_fresh_adapt(learner.policy, theta, sets, alpha0=0.3)
    for k, v in phi.items():
        torch.testing.assert_close(value.adapted[k].detach(), v, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ref[k].detach(), v, rtol=1e-10, atol=1e-12)
    # Without the later sets the objective would be another one: refused.
    with pytest.raises(ValueError, match="samples 2 later episode sets \\(pre1, pre2\\), 0"):
        learner.objective(sets[0], post)
    # A meta-iteration runs exactly these phases: its figures are those of the sets above.
    stats = learner.step().stats
    assert stats["env_steps"] == sum(e.num_steps for e in (*sets, post))
    assert stats["post_return"] == pytest.approx(float(post.task_returns().mean()), rel=1e-12)
    assert not learner.objective(sets[0], post, tuple(sets[1:])).every_step
    learner.close()


def test_inner_episodes_per_task_sets_every_inner_phase_and_the_meta_update_runs_on_them():
    # TRPO with per-layer step sizes of their own: its chained Hessian products take the inner
    # steps' 6-episode sets and the meta-loss's 4-episode set.
    learner = _learner(step_size=0.3, num_steps=2, fresh_episodes=True, episodes_per_task=6,
                       learn_step_size=True, step_size_per="layer", step_size_lr=0.01,
                       optimizer={"name": "trpo"})
    assert {p: learner.episodes_for(p) for p in ("pre", "pre1", "post", "pretrain")} == {
        "pre": 6, "pre1": 6, "post": 4, "pretrain": 4}
    tasks = learner.sample_tasks(0)
    pre = learner.collect(learner.meta_params, tasks, 0, "pre")
    (mid,), phi, _ = learner.adapt_all(pre, tasks, 0)
    post = learner.collect(phi, tasks, 0, "post")
    assert [e.episodes_per_task for e in (pre, mid, post)] == [6, 6, 4]
    objective = learner.objective(pre, post, (mid,))
    theta = {k: v.detach().clone() for k, v in learner.meta_params.items()}
    stats = learner.step().stats
    assert stats["env_steps"] == sum(e.num_steps for e in (pre, mid, post))
    assert stats["rejected_in_a_row"] == 0
    # TRPO's statistics are those of the objective on these episodes at its new theta (the
    # step sizes' own Adam step comes after it), within its KL bound.
    objective.set_old_policy(theta)
    new = {k: theta[k] if k.startswith(STEP_SIZE_PREFIX) else v.detach()
           for k, v in learner.meta_params.items()}
    after = objective(new, kind="surrogate")
    assert 0 < stats["kl"] == pytest.approx(float(after.kl), rel=1e-9)
    assert stats["kl"] <= 0.01
    assert stats["meta_loss_after"] == pytest.approx(float(after.loss), rel=1e-9)
    assert all(not torch.equal(v, theta[k]) for k, v in learner.meta_params.items()
               if k.startswith(STEP_SIZE_PREFIX))
    learner.close()


@pytest.mark.parametrize("optimizer", [{"name": "adam"}, {"name": "trpo"},
                                       {"name": "trpo", "hvp_subsample": 0.5},
                                       {"name": "promp"}])
def test_learner_passes_the_every_step_objective_to_the_meta_update(optimizer):
    learner = _learner(step_size=0.3, num_steps=2, fresh_episodes=True,
                       every_step_objective=True, optimizer=optimizer)
    tasks = learner.sample_tasks(0)
    pre = learner.collect(learner.meta_params, tasks, 0, "pre")
    (mid,), phi, _ = learner.adapt_all(pre, tasks, 0)
    post = learner.collect(phi, tasks, 0, "post")
    objective = learner.objective(pre, post, (mid,))
    assert objective.every_step
    theta = {k: v.detach().clone() for k, v in learner.meta_params.items()}
    # The meta-update optimizes this objective, on the episodes the iteration samples: its
    # figures are the objective's, before the update (Adam) or after it (TRPO, ProMP, whose
    # KL is the mean over both steps from the policies of theta).
    stats = learner.step().stats
    assert stats["rejected_in_a_row"] == 0
    if optimizer["name"] == "adam":
        expected = float(objective(theta).loss)
        assert stats["meta_loss"] == pytest.approx(expected, rel=1e-12)
    else:
        objective.set_old_policy(theta)
        kind = "surrogate" if optimizer["name"] == "trpo" else "clipped"
        after = objective({k: v.detach() for k, v in learner.meta_params.items()}, kind=kind,
                          clip_eps=learner.config.meta_optimizer.clip_eps)
        assert stats["meta_loss_after"] == pytest.approx(float(after.loss), rel=1e-9)
        assert stats["kl"] == pytest.approx(float(after.kl), rel=1e-9)
        assert 0 < stats["kl"] <= (0.01 if optimizer["name"] == "trpo" else float("inf"))
    learner.close()
