"""A task family defined outside the package: register it, configure it, make it through
gymnasium, meta-train on it."""

from __future__ import annotations

import gymnasium
import numpy as np
import pandas as pd
import pytest
import torch
from gymnasium import spaces

from maml_core.config import ConfigError, build_config
from maml_core.tasks import (
    TaskFamily,
    TaskVectorEnv,
    get_task_family,
    register_task_family,
    task_family_names,
)
from maml_core.trainer import MetaLearner

torch.set_num_threads(1)


class PointLineEnv(TaskVectorEnv):
    """A point on a line moves towards a goal it cannot see; natively batched."""

    def __init__(self, tasks, episodes_per_task, horizon, device="cpu", dtype=torch.float32,
                 max_action=0.2):
        self.max_action = float(max_action)
        super().__init__(tasks, episodes_per_task, horizon, device, dtype)
        self.single_observation_space = spaces.Box(-np.inf, np.inf, (1,), np.float32)
        self.single_action_space = spaces.Box(-self.max_action, self.max_action, (1,),
                                              np.float32)
        self.observation_space = spaces.Box(-np.inf, np.inf, (self.num_envs, 1), np.float32)
        self.action_space = spaces.Box(-self.max_action, self.max_action, (self.num_envs, 1),
                                       np.float32)
        self.position = torch.zeros(self.num_envs, 1, device=self.device, dtype=dtype)

    def _apply_tasks(self, tasks: pd.DataFrame) -> None:
        self.goal = self.task_column("goal")

    def reset(self, *, seed=None, options=None):
        self.position = torch.zeros_like(self.position)
        return self.position.clone(), {}

    def step(self, actions):
        actions = torch.as_tensor(actions, dtype=self.dtype, device=self.device)
        self.position = self.position + actions.reshape(self.num_envs, 1).clamp(
            -self.max_action, self.max_action)
        reward = -(self.position[:, 0] - self.goal).abs()
        done = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        return self.position.clone(), reward, done, done.clone(), {}


class PointLine(TaskFamily):
    """Goals at distance 0.5..1 from the origin, on either side: the direction must be learned
    from experience, so adaptation matters."""

    name = "test-point-line"
    gym_id = "TestPointLine"
    default_horizon = 20
    task_params = ("goal",)
    observation_dim = 1
    action_dim = 1

    def __init__(self, max_action: float = 0.2):
        if not max_action > 0:
            raise ValueError(f"test-point-line needs max_action > 0, got {max_action}")
        self.max_action = float(max_action)

    def sample_tasks(self, n, rng):
        goals = rng.choice([-1.0, 1.0], size=n) * rng.uniform(0.5, 1.0, size=n)
        return self._table(n, {"goal": goals})

    def make_env(self, tasks, episodes_per_task, horizon=None, device="cpu",
                 dtype=torch.float32):
        return PointLineEnv(self.validate_tasks(tasks), episodes_per_task,
                            horizon or self.default_horizon, device, dtype, self.max_action)


register_task_family(PointLine)


def _tasks(goals):
    return pd.DataFrame({"task_id": np.arange(len(goals)), "goal": goals})


def test_registered_and_configurable():
    assert "test-point-line" in task_family_names()
    assert isinstance(get_task_family("test-point-line", max_action=0.3), PointLine)
    cfg = build_config({"task": {"family": "test-point-line", "options": {"max_action": 0.3}}})
    assert cfg.family().max_action == 0.3
    with pytest.raises(ConfigError, match="max_action > 0"):
        build_config({"task": {"family": "test-point-line", "options": {"max_action": -1}}})
    with pytest.raises(ConfigError, match=r"task\.options"):
        build_config({"task": {"family": "test-point-line", "options": {"speed": 1}}})

    class Impostor(PointLine):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_task_family(Impostor)


def test_make_vec():
    tasks = _tasks([0.6, -0.9, 0.7])
    env = gymnasium.make_vec("maml/TestPointLine-v0", num_envs=6, tasks=tasks, horizon=5)
    assert isinstance(env, PointLineEnv)
    assert env.num_tasks == 3 and env.episodes_per_task == 2 and env.horizon == 5
    obs, _ = env.reset(seed=0)
    assert obs.shape == (6, 1)
    obs, reward, _, _, _ = env.step(torch.tensor([[0.1], [0.5], [-0.1], [0.0], [0.2], [0.0]]))
    torch.testing.assert_close(obs[:, 0], torch.tensor([0.1, 0.2, -0.1, 0.0, 0.2, 0.0]))
    torch.testing.assert_close(reward, -torch.tensor([0.5, 0.4, 0.8, 0.9, 0.5, 0.7]))
    env = gymnasium.make_vec("maml/TestPointLine-v0", num_envs=4, max_action=0.05)
    assert env.num_tasks == 4 and env.max_action == 0.05


def test_meta_training_on_a_custom_family():
    cfg = build_config({"seed": 1, "meta_batch_size": 20, "episodes_per_task": 10,
                        "task": {"family": "test-point-line"},
                        "policy": {"hidden_sizes": [16]}, "inner": {"step_size": 0.1},
                        "meta_optimizer": {"name": "trpo", "max_kl": 0.02},
                        "evaluation": {"num_tasks": 20, "seed": 3}})
    learner = MetaLearner(cfg)
    assert learner.horizon == 20
    tasks = learner.held_out_tasks()
    before = learner.evaluate(tasks, steps=1).groupby("step")["return"].mean()
    learner.train(10)
    after = learner.evaluate(tasks, steps=1).groupby("step")["return"].mean()
    # Typically about -14 -> -4.5 after one step; the unadapted policy stays near -15.
    assert after[1] >= before[1] + 5.0, (before.tolist(), after.tolist())
    assert after[1] >= after[0] + 5.0, after.tolist()
    learner.close()


def test_task_coordinate_is_the_one_parameter_or_a_family_summary():
    """The number the report lays per-task results out along: a one-parameter family's
    parameter, navigation2d's goal distance from the start, nothing for two free parameters."""
    from maml_core.tasks import get_task_family

    rng = np.random.default_rng(0)
    vel = get_task_family("halfcheetah-vel")
    tasks = vel.sample_tasks(5, rng)
    name, values = vel.task_coordinate(tasks)
    assert name == "velocity" and values.tolist() == tasks["velocity"].tolist()
    nav = get_task_family("navigation2d")
    goals = pd.DataFrame({"task_id": [0, 1], "goal_x": [0.3, -0.5], "goal_y": [0.4, 0.0]})
    name, values = nav.task_coordinate(goals)
    assert name == "goal distance from the start"
    np.testing.assert_allclose(values, [0.5, 0.5])
    sinusoid = get_task_family("sinusoid")
    assert sinusoid.task_coordinate(sinusoid.sample_tasks(3, rng)) is None
