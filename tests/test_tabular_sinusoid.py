"""Tabular MDP and sinusoid task families: sampling, dynamics, seeding, shards, bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from maml_core.tasks import TASK_ID, get_task_family
from maml_core.tasks.sinusoid import Sinusoid
from maml_core.tasks.tabular import (
    TabularMDP,
    TabularMDPEnv,
    mean_reward_columns,
    transition_columns,
)

# ----------------------------------------------------------------------------- tabular


def test_tabular_family_attributes():
    family = get_task_family("tabular-mdp")
    assert isinstance(family, TabularMDP)
    assert family.discrete and family.num_actions == 5 and family.observation_dim == 10
    assert family.default_horizon == 10
    assert len(family.task_params) == 10 * 5 + 10 * 5 * 10
    assert family.task_params[0] == "mean_reward_s0_a0"
    assert family.task_params[50] == "p_s0_a0_to0"
    small = get_task_family("tabular-mdp", num_states=3, num_actions=2)
    assert small.observation_dim == 3 and small.num_actions == 2
    assert len(small.task_params) == 3 * 2 + 3 * 2 * 3


def test_tabular_sampled_distributions():
    family = TabularMDP()
    tasks = family.sample_tasks(200, np.random.default_rng(0))
    assert list(tasks.columns) == [TASK_ID, *family.task_params]
    assert tasks[TASK_ID].tolist() == list(range(200))
    means, probs = family.task_arrays(tasks)
    assert means.shape == (200, 10, 5) and probs.shape == (200, 10, 5, 10)
    # N(1, 1): 10,000 draws -> mean within ~5 standard errors (0.05) of 1, std near 1.
    assert abs(means.mean() - 1.0) < 0.05 and abs(means.std() - 1.0) < 0.05
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-12)
    # Dirichlet(1) over 10 states: each probability has mean 1/10.
    assert abs(probs.mean() - 0.1) < 0.005
    assert abs(probs[..., 3].mean() - 0.1) < 0.01


def test_tabular_sampling_is_seeded():
    family = TabularMDP()
    a = family.sample_tasks(4, np.random.default_rng(7))
    b = family.sample_tasks(4, np.random.default_rng(7))
    c = family.sample_tasks(4, np.random.default_rng(8))
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


def _deterministic_table(family: TabularMDP, num_tasks: int, shift: int) -> tuple[
        pd.DataFrame, np.ndarray]:
    """Tasks where action a moves state s to (s + a + shift) % S, written column by column."""
    s_n, a_n = family.num_states, family.num_actions
    rng = np.random.default_rng(3)
    means = rng.normal(1.0, 1.0, size=(num_tasks, s_n, a_n))
    columns: dict[str, np.ndarray] = {TASK_ID: np.arange(num_tasks)}
    for s in range(s_n):
        for a in range(a_n):
            columns[f"mean_reward_s{s}_a{a}"] = means[:, s, a]
    for s in range(s_n):
        for a in range(a_n):
            for t in range(s_n):
                hit = float(t == (s + a + shift) % s_n)
                columns[f"p_s{s}_a{a}_to{t}"] = np.full(num_tasks, hit)
    return pd.DataFrame(columns), means


def test_tabular_dynamics_by_hand():
    family = TabularMDP(num_states=4, num_actions=3)
    tasks, means = _deterministic_table(family, num_tasks=2, shift=1)
    episodes = 2000
    env = family.make_env(tasks, episodes)
    assert isinstance(env, TabularMDPEnv) and env.num_envs == 2 * episodes
    obs, _ = env.reset(seed=[11, 12])
    assert obs.shape == (env.num_envs, 4) and obs.dtype == torch.float32
    assert (obs[:, 0] == 1).all() and obs.sum(-1).eq(1).all()  # start in state 0
    state = np.zeros(env.num_envs, dtype=np.int64)
    task_of_env = np.repeat(np.arange(2), episodes)
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        actions = torch.randint(0, 3, (env.num_envs,), generator=gen)
        if step % 2:
            actions = actions.unsqueeze(-1)  # [num_envs, 1] is accepted too
        obs, reward, terminated, truncated, _ = env.step(actions)
        a = actions.reshape(-1).numpy()
        expected_mean = means[task_of_env, state, a]
        state = (state + a + 1) % 4
        np.testing.assert_array_equal(obs.argmax(-1).numpy(), state)
        assert obs.sum(-1).eq(1).all() and set(obs.unique().tolist()) <= {0.0, 1.0}
        assert not terminated.any() and not truncated.any()
        # reward = mean + N(0, 1) noise: the residual has mean 0 and std 1 over 4000 draws.
        residual = reward.double().numpy() - expected_mean
        assert abs(residual.mean()) < 5 / math.sqrt(env.num_envs)
        assert abs(residual.std() - 1.0) < 0.1


def test_tabular_reward_mean_per_state_action():
    family = TabularMDP(num_states=3, num_actions=2)
    tasks, means = _deterministic_table(family, num_tasks=1, shift=0)
    env = family.make_env(tasks, 5000)
    env.reset(seed=5)
    # Action 1 first (state 0 -> 1), then action 0 (stays in 1).
    _, r0, *_ = env.step(torch.ones(env.num_envs, dtype=torch.long))
    _, r1, *_ = env.step(torch.zeros(env.num_envs, dtype=torch.long))
    tol = 5 / math.sqrt(env.num_envs)
    assert abs(r0.mean().item() - means[0, 0, 1]) < tol
    assert abs(r1.mean().item() - means[0, 1, 0]) < tol


def test_tabular_transition_frequencies():
    family = TabularMDP(num_states=3, num_actions=1)
    probs = np.array([[[[0.2, 0.0, 0.8]], [[1, 0, 0]], [[1, 0, 0]]]])  # [1, S, A, S]
    tasks = family.tasks_from_arrays(np.zeros((1, 3, 1)), probs)
    env = family.make_env(tasks, 20000)
    env.reset(seed=0)
    obs, *_ = env.step(torch.zeros(env.num_envs, dtype=torch.long))
    freq = obs.mean(0).double().numpy()
    np.testing.assert_allclose(freq, [0.2, 0.0, 0.8], atol=0.015)


def _rollout(env: TabularMDPEnv, seed, actions: torch.Tensor):
    obs, _ = env.reset(seed=seed)
    states, rewards = [obs.argmax(-1)], []
    for t in range(actions.shape[0]):
        obs, reward, *_ = env.step(actions[t])
        states.append(obs.argmax(-1))
        rewards.append(reward)
    return torch.stack(states), torch.stack(rewards)


def test_tabular_env_seeded_determinism():
    family = TabularMDP()
    tasks = family.sample_tasks(3, np.random.default_rng(1))
    actions = torch.randint(0, 5, (10, 3 * 4), generator=torch.Generator().manual_seed(1))
    s1, r1 = _rollout(family.make_env(tasks, 4), [5, 6, 7], actions)
    s2, r2 = _rollout(family.make_env(tasks, 4), [5, 6, 7], actions)
    _, r3 = _rollout(family.make_env(tasks, 4), [9, 6, 7], actions)
    assert torch.equal(s1, s2) and torch.equal(r1, r2)
    assert not torch.equal(r1[:, :4], r3[:, :4])  # task 0 re-seeded
    assert torch.equal(r1[:, 4:], r3[:, 4:])  # other tasks untouched
    # Episodes of one task differ from each other (noise is drawn per episode).
    assert not torch.equal(r1[:, 0], r1[:, 1])


def test_tabular_shard_reproduces_draws():
    family = TabularMDP()
    tasks = family.sample_tasks(2, np.random.default_rng(2))
    e = 3
    actions = torch.randint(0, 5, (8, 2 * e), generator=torch.Generator().manual_seed(2))
    both_s, both_r = _rollout(family.make_env(tasks, e), [100, 200], actions)
    for i, seed in ((0, 100), (1, 200)):
        alone = tasks.iloc[[i]]
        s, r = _rollout(family.make_env(alone, e), [seed], actions[:, i * e:(i + 1) * e])
        assert torch.equal(s, both_s[:, i * e:(i + 1) * e])
        assert torch.equal(r, both_r[:, i * e:(i + 1) * e])


def test_tabular_bad_inputs():
    family = TabularMDP(num_states=3, num_actions=2)
    tasks = family.sample_tasks(2, np.random.default_rng(0))
    env = family.make_env(tasks, 2)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(torch.zeros(4, dtype=torch.long))
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(4,\) or \(4, 1\)"):
        env.step(torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        env.step(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        env.step(torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        env.step(torch.tensor([0, -1, 0, 0]))
    with pytest.raises(ValueError, match="integer"):
        env.step(torch.tensor([0.5, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="lacks 1 column"):
        family.make_env(tasks.drop(columns=["p_s2_a1_to0"]), 2)
    with pytest.raises(ValueError, match="num_states/num_actions"):
        TabularMDP().make_env(tasks, 2)  # a 3-state table with a 10-state family
    bad = tasks.copy()
    bad["p_s0_a0_to0"] += 0.5
    with pytest.raises(ValueError, match="must sum to 1"):
        family.make_env(bad, 2)
    bad = tasks.copy()
    bad["p_s1_a0_to0"], bad["p_s1_a0_to1"] = -0.1, bad["p_s1_a0_to1"] + bad["p_s1_a0_to0"] + 0.1
    with pytest.raises(ValueError, match="negative"):
        family.make_env(bad, 2)
    with pytest.raises(ValueError, match="num_states"):
        TabularMDP(num_states=0)
    with pytest.raises(ValueError, match="mean_rewards must have shape"):
        family.tasks_from_arrays(np.zeros((1, 3, 3)), np.zeros((1, 3, 3, 3)))
    assert mean_reward_columns(1, 2) == ["mean_reward_s0_a0", "mean_reward_s0_a1"]
    assert transition_columns(1, 1) == ["p_s0_a0_to0"]


# ----------------------------------------------------------------------------- sinusoid


def test_sinusoid_sampling_ranges():
    family = get_task_family("sinusoid")
    assert isinstance(family, Sinusoid) and family.kind == "supervised"
    assert family.input_dim == 1 and family.output_dim == 1
    tasks = family.sample_tasks(1000, np.random.default_rng(0))
    assert list(tasks.columns) == [TASK_ID, "amplitude", "phase"]
    assert tasks["amplitude"].between(0.1, 5.0).all()
    assert tasks["phase"].between(0.0, math.pi).all()
    assert tasks["amplitude"].max() > 4.8 and tasks["amplitude"].min() < 0.3
    x, _ = family.sample_batch(tasks, 50, torch.Generator().manual_seed(0))
    assert x.shape == (1000, 50, 1) and x.min() >= -5.0 and x.max() <= 5.0
    assert x.min() < -4.9 and x.max() > 4.9
    with pytest.raises(NotImplementedError):
        family.make_env(tasks, 1)


def test_sinusoid_labels_are_exact():
    family = Sinusoid()
    tasks = family.sample_tasks(5, np.random.default_rng(1))
    x, y = family.sample_batch(tasks, 10, torch.Generator().manual_seed(1), dtype=torch.float64)
    assert x.dtype == y.dtype == torch.float64 and y.shape == (5, 10, 1)
    amp = torch.tensor(tasks["amplitude"].to_numpy()).view(-1, 1, 1)
    phase = torch.tensor(tasks["phase"].to_numpy()).view(-1, 1, 1)
    assert torch.equal(y, amp * torch.sin(x - phase))
    # target with shared points [m, 1] broadcasts to every task.
    grid = torch.linspace(-5, 5, 7, dtype=torch.float64).unsqueeze(-1)
    assert torch.equal(family.target(tasks, grid), amp * torch.sin(grid.unsqueeze(0) - phase))
    assert torch.equal(family.target(tasks, x), y)


def test_sinusoid_determinism_and_shards():
    family = Sinusoid()
    tasks = family.sample_tasks(3, np.random.default_rng(2))
    pd.testing.assert_frame_equal(tasks, family.sample_tasks(3, np.random.default_rng(2)))

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    x1, y1 = family.sample_batch(tasks, 8, gens([10, 20, 30]))
    x2, y2 = family.sample_batch(tasks, 8, gens([10, 20, 30]))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1[0], x1[1])
    xa, ya = family.sample_batch(tasks, 8, torch.Generator().manual_seed(4))
    xb, yb = family.sample_batch(tasks, 8, torch.Generator().manual_seed(4))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for i, seed in enumerate((10, 20, 30)):
        xs, ys = family.sample_batch(tasks.iloc[[i]], 8, gens([seed]))
        assert torch.equal(xs[0], x1[i]) and torch.equal(ys[0], y1[i])


def test_sinusoid_options_and_bad_inputs():
    family = Sinusoid(amp_low=1.0, amp_high=2.0, phase_low=0.5, phase_high=0.5, x_low=0.0,
                      x_high=1.0)
    tasks = family.sample_tasks(50, np.random.default_rng(0))
    assert tasks["amplitude"].between(1.0, 2.0).all() and (tasks["phase"] == 0.5).all()
    x, _ = family.sample_batch(tasks, 4, torch.Generator().manual_seed(0))
    assert x.min() >= 0.0 and x.max() <= 1.0
    with pytest.raises(ValueError, match="amp_low <= amp_high"):
        Sinusoid(amp_low=3.0, amp_high=1.0)
    with pytest.raises(ValueError, match="one generator per task"):
        family.sample_batch(tasks, 4, [torch.Generator()])
    with pytest.raises(ValueError, match="k"):
        family.sample_batch(tasks, 0, torch.Generator())
    with pytest.raises(ValueError, match="lacks column"):
        family.sample_batch(tasks.drop(columns=["phase"]), 4, torch.Generator())
    with pytest.raises(ValueError, match=r"\[50, m, 1\]"):
        family.target(tasks, torch.zeros(3, 4, 1))
