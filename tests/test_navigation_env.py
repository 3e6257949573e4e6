"""2D navigation: dynamics and reward by hand, and the batched env against a one-env loop."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from maml_core.policies import GaussianMLPPolicy
from maml_core.rollouts import collect_episodes
from maml_core.tasks import get_task_family
from maml_core.tasks.navigation import Navigation2D, Navigation2DEnv

torch.set_num_threads(1)
D = torch.float64


def _tasks(goals):
    goals = np.asarray(goals, dtype=np.float64)
    return pd.DataFrame({"task_id": np.arange(len(goals)), "goal_x": goals[:, 0],
                         "goal_y": goals[:, 1]})


def test_dynamics_reward_and_termination_by_hand():
    env = Navigation2D().make_env(_tasks([[0.25, -0.05], [0.05, 0.0]]), 1, horizon=10, dtype=D)
    obs, _ = env.reset(seed=0)
    torch.testing.assert_close(obs, torch.zeros(2, 2, dtype=D))
    # Task 0 moves (0.3, -0.02) -> clipped to (0.1, -0.02); task 1 moves (0.045, 0.005) and
    # lands within 0.01 of its goal in both coordinates.
    obs, reward, terminated, truncated, _ = env.step(torch.tensor([[0.3, -0.02],
                                                                  [0.045, 0.005]], dtype=D))
    torch.testing.assert_close(obs, torch.tensor([[0.1, -0.02], [0.045, 0.005]], dtype=D))
    expected = [-math.hypot(0.1 - 0.25, -0.02 + 0.05), -math.hypot(0.045 - 0.05, 0.005)]
    torch.testing.assert_close(reward, torch.tensor(expected, dtype=D), rtol=0, atol=1e-15)
    assert terminated.tolist() == [False, True] and truncated.tolist() == [False, False]
    # Next step: task 0 moves by (-0.5, 0.5) -> (-0.1, 0.1); task 1 is frozen, pays nothing.
    obs, reward, terminated, _, _ = env.step(torch.tensor([[-0.5, 0.5], [0.1, 0.1]], dtype=D))
    torch.testing.assert_close(obs, torch.tensor([[0.0, 0.08], [0.045, 0.005]], dtype=D))
    torch.testing.assert_close(reward, torch.tensor([-math.hypot(0.25, 0.13), 0.0], dtype=D),
                               rtol=0, atol=1e-15)
    assert terminated.tolist() == [False, True]
    # Reset un-freezes everything.
    obs, _ = env.reset()
    _, reward, terminated, _, _ = env.step(torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=D))
    torch.testing.assert_close(reward, -torch.tensor([math.hypot(0.25, 0.05), 0.05], dtype=D))
    assert terminated.tolist() == [False, False]


def test_normalized_actions_scale_by_max_action_then_clip():
    env = Navigation2D(normalized_actions=True).make_env(_tasks([[0.25, -0.05]]), 1,
                                                         horizon=5, dtype=D)
    assert env.single_action_space.high.tolist() == [1.0, 1.0]
    env.reset()
    # (0.5, -3.0) in policy units -> (0.05, -0.3) in the plane -> clipped to (0.05, -0.1)
    obs, reward, *_ = env.step(torch.tensor([[0.5, -3.0]], dtype=D))
    torch.testing.assert_close(obs, torch.tensor([[0.05, -0.1]], dtype=D))
    torch.testing.assert_close(reward, torch.tensor([-math.hypot(0.05 - 0.25, -0.1 + 0.05)],
                                                    dtype=D), rtol=0, atol=1e-15)
    # the same displacement without normalization needs the action in plane units
    raw = Navigation2D().make_env(_tasks([[0.25, -0.05]]), 1, horizon=5, dtype=D)
    raw.reset()
    raw_obs, raw_reward, *_ = raw.step(torch.tensor([[0.05, -0.3]], dtype=D))
    torch.testing.assert_close(raw_obs, obs)
    torch.testing.assert_close(raw_reward, reward)


def test_no_termination_when_disabled_and_bad_actions():
    family = get_task_family("navigation2d", terminate_at_goal=False)
    env = family.make_env(_tasks([[0.05, 0.0]]), 1, dtype=D)
    env.reset()
    _, _, terminated, _, _ = env.step(torch.tensor([[0.05, 0.0]], dtype=D))
    assert not terminated.any()
    with pytest.raises(ValueError, match=r"shape \(1, 2\)"):
        env.step(torch.zeros(2, 2, dtype=D))


class ReferenceNavigation:
    """One navigation environment in plain Python, written from the paper's description."""

    def __init__(self, goal, max_action=0.1, tolerance=0.01):
        self.goal, self.max_action, self.tolerance = np.asarray(goal, float), max_action, tolerance

    def reset(self):
        self.pos, self.done = np.zeros(2), False
        return self.pos.copy()

    def step(self, action):
        if self.done:
            return self.pos.copy(), 0.0, True
        self.pos = self.pos + np.clip(action, -self.max_action, self.max_action)
        offset = self.pos - self.goal
        reward = -math.sqrt(offset[0] ** 2 + offset[1] ** 2)
        self.done = bool(abs(offset[0]) < self.tolerance and abs(offset[1]) < self.tolerance)
        return self.pos.copy(), reward, self.done


def test_batched_env_equals_single_env_loop():
    tol = 0.05  # a generous tolerance, so that random walks do reach some goals
    family = Navigation2D(low=-0.15, high=0.15, goal_tolerance=tol)
    rng = np.random.default_rng(0)
    num_tasks, episodes, horizon = 5, 3, 30
    env = family.make_env(family.sample_tasks(num_tasks, rng), episodes, horizon, dtype=D)
    terminations = 0
    for _ in range(2):  # two rounds of tasks, each run from a fresh reset
        tasks = family.sample_tasks(num_tasks, rng)
        env.set_tasks(tasks)
        refs = [ReferenceNavigation((g.goal_x, g.goal_y), tolerance=tol)
                for g in tasks.itertuples() for _ in range(episodes)]
        obs, _ = env.reset(seed=[1, 2, 3, 4, 5])
        np.testing.assert_array_equal(obs.numpy(), np.stack([r.reset() for r in refs]))
        for _ in range(horizon):
            actions = rng.uniform(-0.2, 0.2, size=(env.num_envs, 2))
            obs, reward, terminated, truncated, _ = env.step(torch.tensor(actions, dtype=D))
            out = [r.step(a) for r, a in zip(refs, actions)]
            np.testing.assert_allclose(obs.numpy(), np.stack([o[0] for o in out]),
                                       rtol=0, atol=1e-14)
            np.testing.assert_allclose(reward.numpy(), [o[1] for o in out], rtol=0, atol=1e-14)
            assert terminated.tolist() == [o[2] for o in out]
            assert not truncated.any()
        terminations += int(terminated.sum())
    assert 0 < terminations < 2 * env.num_envs  # both kinds of episodes were compared


def test_rollout_masks_of_an_episode_that_ends_early():
    # A deterministic policy (zero weights, bias 0.1 in x) walks straight to a goal at (0.3, 0):
    # it arrives after 3 steps; the 4th and later steps are masked out.
    policy = GaussianMLPPolicy(2, 2, hidden_sizes=[4]).to(D)
    params = {k: torch.zeros_like(v) for k, v in policy.params().items()}
    params["layers.1.bias"] = torch.tensor([0.1, 0.0], dtype=D)
    params["log_std"] = torch.full((2,), -30.0, dtype=D)  # noise ~ 1e-13
    env = Navigation2DEnv(_tasks([[0.3, 0.0], [0.0, 0.9]]), 1, horizon=6, dtype=D)
    episodes = collect_episodes(env, policy, params, seeds=[0, 1])
    assert episodes.masks[:, 0, 0].tolist() == [1, 1, 1, 0, 0, 0]
    assert episodes.masks[:, 1, 0].tolist() == [1] * 6
    expected = [-0.2, -0.1, 0.0, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(episodes.rewards[:, 0, 0].numpy(), expected, atol=1e-9)
    np.testing.assert_allclose(episodes.episode_returns()[0, 0].item(), -0.3, atol=1e-9)
    assert episodes.num_steps == 3 + 6


def test_make_vec_builds_the_navigation_env():
    import gymnasium

    tasks = _tasks([[0.2, 0.2], [-0.3, 0.1]])
    env = gymnasium.make_vec("maml/Navigation2D-v0", num_envs=4, tasks=tasks, horizon=7)
    assert isinstance(env, Navigation2DEnv)
    assert env.num_tasks == 2 and env.episodes_per_task == 2 and env.horizon == 7
    env.reset()
    _, reward, _, _, _ = env.step(torch.zeros(4, 2))
    expected = -np.repeat(np.hypot(tasks.goal_x, tasks.goal_y), 2)
    np.testing.assert_allclose(reward.numpy(), expected, rtol=1e-6)
