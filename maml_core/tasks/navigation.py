"""2D navigation (Finn et al. 2017, section 5.3): a point moves to a goal it cannot see.

State: the point's position, starting at the origin. Action: a displacement clipped to
[-0.1, 0.1]^2. Reward: minus the Euclidean distance to the goal after the move. As in the
paper's code, an episode ends early once the point is within ``goal_tolerance`` of the goal
in both coordinates (``terminate_at_goal``). Goals are uniform in [-0.5, 0.5]^2.

``normalized_actions``: the policy acts in [-1, 1]^2 and the displacement is ``max_action``
times its action, clipped -- the action normalization of the paper's code (rllab's
``normalize`` wrapper). A unit standard deviation then means 0.1 in the plane instead of ten
times the largest step, which is what lets an adapted policy stop on the goal.

Natively batched: all ``tasks x episodes`` points are stepped by a handful of tensor ops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from gymnasium import spaces

from maml_core.tasks.base import TaskFamily, TaskVectorEnv, register_task_family


class Navigation2DEnv(TaskVectorEnv):
    def __init__(self, tasks: pd.DataFrame, episodes_per_task: int, horizon: int = 100,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 max_action: float = 0.1, terminate_at_goal: bool = True,
                 goal_tolerance: float = 0.01, normalized_actions: bool = False):
        self.max_action = float(max_action)
        self.terminate_at_goal = bool(terminate_at_goal)
        self.goal_tolerance = float(goal_tolerance)
        self.action_scale = self.max_action if normalized_actions else 1.0
        bound = 1.0 if normalized_actions else self.max_action
        super().__init__(tasks, episodes_per_task, horizon, device, dtype)
        self.single_observation_space = spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.single_action_space = spaces.Box(-bound, bound, (2,), np.float32)
        self.observation_space = spaces.Box(-np.inf, np.inf, (self.num_envs, 2), np.float32)
        self.action_space = spaces.Box(-bound, bound, (self.num_envs, 2), np.float32)
        self.position = torch.zeros(self.num_envs, 2, device=self.device, dtype=dtype)
        self.done = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)

    def _apply_tasks(self, tasks: pd.DataFrame) -> None:
        self.goal = torch.stack([self.task_column("goal_x"), self.task_column("goal_y")], dim=-1)

    def reset(self, *, seed: int | Sequence[int] | None = None,
              options: dict[str, Any] | None = None):
        # The start state is deterministic (the origin); ``seed`` is accepted for the API.
        self.position.zero_()
        self.done.zero_()
        return self.position.clone(), {}

    def step(self, actions: torch.Tensor):
        actions = torch.as_tensor(actions, dtype=self.dtype, device=self.device)
        if actions.shape != (self.num_envs, 2):
            raise ValueError(f"actions must have shape ({self.num_envs}, 2), got "
                             f"{tuple(actions.shape)}")
        active = ~self.done
        if self.action_scale != 1.0:
            actions = actions * self.action_scale
        step = actions.clamp(-self.max_action, self.max_action) * active.unsqueeze(-1)
        self.position = self.position + step
        offset = self.position - self.goal
        reward = -torch.linalg.vector_norm(offset, dim=-1) * active
        if self.terminate_at_goal:
            reached = (offset.abs() < self.goal_tolerance).all(dim=-1)
            self.done = self.done | reached
        terminated = self.done.clone()
        truncated = torch.zeros_like(terminated)
        return self.position.clone(), reward, terminated, truncated, {}


@register_task_family
class Navigation2D(TaskFamily):
    name = "navigation2d"
    gym_id = "Navigation2D"
    default_horizon = 100
    task_params = ("goal_x", "goal_y")
    observation_dim = 2
    action_dim = 2

    def __init__(self, low: float = -0.5, high: float = 0.5, max_action: float = 0.1,
                 terminate_at_goal: bool = True, goal_tolerance: float = 0.01,
                 normalized_actions: bool = False):
        if not low < high:
            raise ValueError(f"navigation2d needs low < high, got low={low}, high={high}")
        if not (max_action > 0 and goal_tolerance >= 0):
            raise ValueError(f"navigation2d needs max_action > 0 and goal_tolerance >= 0, got "
                             f"max_action={max_action}, goal_tolerance={goal_tolerance}")
        self.low, self.high = float(low), float(high)
        self.max_action = float(max_action)
        self.terminate_at_goal = bool(terminate_at_goal)
        self.goal_tolerance = float(goal_tolerance)
        self.normalized_actions = bool(normalized_actions)

    def sample_tasks(self, n: int, rng: np.random.Generator) -> pd.DataFrame:
        goals = rng.uniform(self.low, self.high, size=(n, 2))
        return self._table(n, {"goal_x": goals[:, 0], "goal_y": goals[:, 1]})

    def task_coordinate(self, tasks: pd.DataFrame) -> tuple[str, np.ndarray]:
        """The goal's distance from the start (the origin): how far the point has to go."""
        return "goal distance from the start", np.hypot(
            tasks["goal_x"].to_numpy(dtype=np.float64), tasks["goal_y"].to_numpy(dtype=np.float64))

    def make_env(self, tasks, episodes_per_task, horizon=None, device="cpu",
                 dtype=torch.float32) -> Navigation2DEnv:
        return Navigation2DEnv(self.validate_tasks(tasks), episodes_per_task,
                               horizon or self.default_horizon, device, dtype,
                               self.max_action, self.terminate_at_goal, self.goal_tolerance,
                               self.normalized_actions)
