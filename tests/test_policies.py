"""Policies: batched parameters, distributions against torch.distributions, sampling, and the
per-task seeding of rollouts (a shard of tasks gives the same episodes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Normal, kl_divergence

from maml_core.policies import MLP, CategoricalMLPPolicy, GaussianMLPPolicy
from maml_core.rollouts import collect_episodes
from maml_core.seeding import derive_seed, generator
from maml_core.tasks import get_task_family

torch.set_num_threads(1)


def _perturbed(policy, seed, scale=0.3):
    g = generator(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype)
            for k, v in policy.params().items()}


def _stack(param_sets):
    return {k: torch.stack([p[k] for p in param_sets]) for k in param_sets[0]}


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_batched_gaussian_params_match_per_task_evaluation(activation):
    policy = GaussianMLPPolicy(3, 2, hidden_sizes=[16, 8], activation=activation)
    policy.reset_parameters(generator(0))
    sets = [_perturbed(policy, s) for s in range(4)]
    batched = _stack(sets)
    obs = torch.randn(4, 7, 3, generator=generator(9))
    mean, log_std = policy.distribution(batched, obs)
    assert mean.shape == log_std.shape == (4, 7, 2)
    for i, p in enumerate(sets):
        m_i, s_i = policy.distribution(p, obs[i])
        torch.testing.assert_close(mean[i], m_i, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(log_std[i], s_i)
        torch.testing.assert_close(log_std[i], p["log_std"].expand(7, 2))
        torch.testing.assert_close(mean[i], torch.func.functional_call(policy, p, (obs[i],)),
                                   rtol=1e-5, atol=1e-6)
    # The task dimension may also carry extra batch dimensions: [tasks, T, E, obs].
    obs4 = torch.randn(4, 5, 3, 3, generator=generator(10))
    mean4, _ = policy.distribution(batched, obs4)
    assert mean4.shape == (4, 5, 3, 2)
    for i, p in enumerate(sets):
        torch.testing.assert_close(mean4[i], policy.distribution(p, obs4[i])[0],
                                   rtol=1e-5, atol=1e-6)


def test_batched_categorical_params_match_per_task_evaluation():
    policy = CategoricalMLPPolicy(4, 5, hidden_sizes=[8])
    policy.reset_parameters(generator(1))
    sets = [_perturbed(policy, s) for s in range(3)]
    obs = torch.randn(3, 6, 4, generator=generator(2))
    (logp,) = policy.distribution(_stack(sets), obs)
    plain = MLP(4, 5, hidden_sizes=[8])  # same architecture, outputs the logits
    for i, p in enumerate(sets):
        logits = torch.func.functional_call(plain, p, (obs[i],))
        torch.testing.assert_close(logp[i], torch.log_softmax(logits, -1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logp[i], policy.distribution(p, obs[i])[0],
                                   rtol=1e-5, atol=1e-6)
        assert torch.equal(torch.func.functional_call(policy, p, (obs[i],)), logits.argmax(-1))


def test_gaussian_log_prob_kl_entropy_match_torch_distributions():
    g = generator(3)
    m0, m1 = torch.randn(10, 3, generator=g), torch.randn(10, 3, generator=g)
    s0, s1 = 0.5 * torch.randn(10, 3, generator=g), 0.5 * torch.randn(10, 3, generator=g)
    a = torch.randn(10, 3, generator=g)
    ref0, ref1 = Normal(m0, s0.exp()), Normal(m1, s1.exp())
    torch.testing.assert_close(GaussianMLPPolicy.log_prob_of((m0, s0), a),
                               ref0.log_prob(a).sum(-1))
    torch.testing.assert_close(GaussianMLPPolicy.kl((m0, s0), (m1, s1)),
                               kl_divergence(ref0, ref1).sum(-1))
    torch.testing.assert_close(GaussianMLPPolicy.entropy((m0, s0)), ref0.entropy().sum(-1))
    assert torch.all(GaussianMLPPolicy.kl((m0, s0), (m0, s0)).abs() < 1e-6)


def test_categorical_log_prob_kl_entropy_match_torch_distributions():
    g = generator(4)
    l0 = torch.log_softmax(torch.randn(10, 5, generator=g), -1)
    l1 = torch.log_softmax(torch.randn(10, 5, generator=g), -1)
    a = torch.randint(0, 5, (10,), generator=g)
    ref0, ref1 = Categorical(logits=l0), Categorical(logits=l1)
    torch.testing.assert_close(CategoricalMLPPolicy.log_prob_of((l0,), a), ref0.log_prob(a))
    torch.testing.assert_close(CategoricalMLPPolicy.kl((l0,), (l1,)), kl_divergence(ref0, ref1))
    torch.testing.assert_close(CategoricalMLPPolicy.entropy((l0,)), ref0.entropy())


def test_categorical_sampler_frequencies():
    policy = CategoricalMLPPolicy(2, 4, hidden_sizes=[4])
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 200_000
    dist = (probs.log().expand(n, 4),)
    actions = policy.sample_with(dist, policy.noise((n,), generator(5)))
    assert actions.shape == (n,) and actions.min() >= 0 and actions.max() <= 3
    freq = torch.bincount(actions, minlength=4).double() / n
    # 5 standard errors: sqrt(p (1 - p) / n) <= 0.0011
    assert torch.all((freq - probs.double()).abs() < 5 * 0.0011)
    # A zero-probability action is never drawn.
    dist = (torch.tensor([0.5, 0.0, 0.5, 0.0]).log().expand(20_000, 4),)
    actions = policy.sample_with(dist, policy.noise((20_000,), generator(6)))
    assert set(actions.unique().tolist()) == {0, 2}


def test_gaussian_sampler_moments():
    policy = GaussianMLPPolicy(2, 2, hidden_sizes=[4])
    n = 100_000
    mean = torch.tensor([0.5, -1.0]).expand(n, 2)
    log_std = torch.tensor([0.0, -1.0]).expand(n, 2)
    x = policy.sample_with((mean, log_std), policy.noise((n,), generator(7)))
    torch.testing.assert_close(x.mean(0), torch.tensor([0.5, -1.0]), rtol=0, atol=0.02)
    torch.testing.assert_close(x.std(0), torch.tensor([1.0, np.exp(-1.0)], dtype=torch.float32),
                               rtol=0.02, atol=0)


@pytest.mark.parametrize("family_name", ["navigation2d", "tabular-mdp"])
@pytest.mark.parametrize("batched", [False, True])
def test_rollout_shard_property(family_name, batched):
    family = get_task_family(family_name)
    tasks = family.sample_tasks(3, np.random.default_rng(0))
    if family.discrete:
        policy = CategoricalMLPPolicy(family.observation_dim, family.num_actions, [16])
    else:
        policy = GaussianMLPPolicy(family.observation_dim, family.action_dim, [16])
    policy.reset_parameters(generator(2))
    per_task = [_perturbed(policy, 10 + i) for i in range(3)]
    seeds = [derive_seed(0, 0, "pre", int(t)) for t in tasks["task_id"]]

    def collect(index):
        env = family.make_env(tasks.iloc[index], 4, 20)
        params = _stack([per_task[i] for i in index]) if batched else policy.params()
        return collect_episodes(env, policy, params, [seeds[i] for i in index])

    both = collect([0, 2])
    alone = collect([0])
    other_order = collect([2, 0])
    for name in ("observations", "actions", "rewards", "masks"):
        assert torch.equal(getattr(both, name)[:, 0], getattr(alone, name)[:, 0]), name
        assert torch.equal(getattr(other_order, name)[:, 1], getattr(alone, name)[:, 0]), name
    # ... and the tasks are not simply copies of each other.
    assert not torch.equal(both.actions[:, 0], both.actions[:, 1])
    # Seeds matter: another seed gives other episodes of the same task.
    env = family.make_env(tasks.iloc[[0]], 4, 20)
    params = _stack([per_task[0]]) if batched else policy.params()
    again = collect_episodes(env, policy, params, [seeds[0] + 1])
    assert not torch.equal(again.actions, alone.actions)


def test_min_log_std_bounds_the_distribution_and_survives_a_reload():
    from flows.policy_model import policy_from_architecture
    from maml_core.config import build_config

    policy = GaussianMLPPolicy(3, 2, [8], min_log_std=-1.0)
    policy.reset_parameters(generator(0))
    params = policy.params()
    params["log_std"] = torch.tensor([-2.5, 0.3], requires_grad=True)
    obs, actions = torch.randn(5, 3), torch.randn(5, 2)
    mean, log_std = policy.distribution(params, obs)
    assert torch.equal(log_std, torch.tensor([-1.0, 0.3]).expand(5, 2))
    # Below the bound the log std gets no gradient (nothing pushes it further down); above it
    # the gradient is the Gaussian's: d/ds log N(a; m, e^s) = z^2 - 1.
    policy.log_prob_of((mean, log_std), actions).sum().backward()
    z = (actions[:, 1] - mean[:, 1].detach()) / torch.exp(torch.tensor(0.3))
    assert params["log_std"].grad[0] == 0
    torch.testing.assert_close(params["log_std"].grad[1], (z.pow(2) - 1).sum())
    again = policy_from_architecture(policy.architecture())
    assert again.min_log_std == -1.0
    assert GaussianMLPPolicy(3, 2, [8]).distribution(params, obs)[1][0, 0] == -2.5
    with pytest.raises(ValueError, match=r"min_log_std .* above policy.init_log_std"):
        build_config({"policy": {"init_log_std": -1.0, "min_log_std": -0.5}})
    # The config's bound reaches the learner's policy (and so its checkpoints and models).
    from maml_core.trainer import MetaLearner

    learner = MetaLearner(build_config({"policy": {"hidden_sizes": [4],
                                                   "min_log_std": -0.25}}))
    assert learner.policy.architecture()["min_log_std"] == -0.25
    params = learner.policy.params()
    params["log_std"] = torch.full_like(params["log_std"], -3.0)
    assert learner.policy.distribution(params, torch.zeros(1, 2))[1].min() == -0.25
