"""Random tabular MDPs (Duan et al. 2016, "RL^2", section 4.2; used in MAML comparisons).

A task is a finite MDP with ``num_states`` states (default 10) and ``num_actions`` actions
(default 5). Every episode starts in state 0. For each (state, action) pair a task draws a mean
reward from N(1, 1) and a transition distribution over next states from Dirichlet(1, ..., 1).
Each step pays a reward drawn from N(mean_reward[s, a], 1) and moves to a next state sampled
from the transition row. Episodes never terminate early; the rollout horizon ends them.

Task table encoding: one row per task holds the whole MDP, flattened into columns
``mean_reward_s{s}_a{a}`` (``S * A`` columns) and ``p_s{s}_a{a}_to{t}`` (``S * A * S``
columns, the probability of moving from ``s`` to ``t`` under ``a``) -- 50 + 500 columns for the
defaults. ``TabularMDP.tasks_from_arrays`` builds such a table from arrays and
``TabularMDP.task_arrays`` reads it back.

Observations are the one-hot encoding of the current state; actions are integer indices.
Natively batched: all ``tasks x episodes`` sub-environments are stepped by a few tensor ops.
Randomness is drawn per task from one ``torch.Generator`` per task, so a shard of tasks
reproduces exactly the draws those tasks get when run together with others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from gymnasium import spaces

from maml_core.tasks.base import TaskFamily, TaskVectorEnv, register_task_family

# Transition rows read from a table may carry rounding error (e.g. a CSV); rows within this
# tolerance of summing to 1 are accepted and renormalised, others are rejected.
_ROW_SUM_TOL = 1e-4


def mean_reward_columns(num_states: int, num_actions: int) -> list[str]:
    """Column names of the mean rewards, ordered (state, action)."""
    return [f"mean_reward_s{s}_a{a}" for s in range(num_states) for a in range(num_actions)]


def transition_columns(num_states: int, num_actions: int) -> list[str]:
    """Column names of the transition probabilities, ordered (state, action, next state)."""
    return [f"p_s{s}_a{a}_to{t}" for s in range(num_states) for a in range(num_actions)
            for t in range(num_states)]


def _check_sizes(num_states: int, num_actions: int) -> tuple[int, int]:
    for label, value in (("num_states", num_states), ("num_actions", num_actions)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"tabular-mdp needs {label} to be an integer >= 1, got {value!r}")
    return int(num_states), int(num_actions)


def _task_arrays(tasks: pd.DataFrame, num_states: int,
                 num_actions: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean rewards [n, S, A] and transitions [n, S, A, S] (float64) of a checked task table."""
    if not isinstance(tasks, pd.DataFrame):
        raise TypeError(f"tasks must be a pandas DataFrame, got {type(tasks).__name__}")
    reward_cols = mean_reward_columns(num_states, num_actions)
    prob_cols = transition_columns(num_states, num_actions)
    missing = [c for c in reward_cols + prob_cols if c not in tasks.columns]
    if missing:
        shown = missing[:5] + (["..."] if len(missing) > 5 else [])
        raise ValueError(
            f"the task table for 'tabular-mdp' lacks {len(missing)} column(s) {shown} for "
            f"num_states={num_states}, num_actions={num_actions}; build the table with "
            "TabularMDP.sample_tasks / TabularMDP.tasks_from_arrays, or pass the family the "
            "num_states/num_actions the table was made with")
    n = len(tasks)
    means = tasks[reward_cols].to_numpy(dtype=np.float64, copy=True)
    means = means.reshape(n, num_states, num_actions)
    probs = tasks[prob_cols].to_numpy(dtype=np.float64, copy=True)
    probs = probs.reshape(n, num_states, num_actions, num_states)
    if not (np.isfinite(means).all() and np.isfinite(probs).all()):
        raise ValueError("the task table for 'tabular-mdp' has NaN or infinite parameters")
    if (probs < 0).any():
        task, s, a, t = np.argwhere(probs < 0)[0]
        raise ValueError(f"the task table for 'tabular-mdp' has a negative transition "
                         f"probability (row {task}, column p_s{s}_a{a}_to{t}); transition "
                         "probabilities must be >= 0")
    sums = probs.sum(axis=-1)
    bad = np.abs(sums - 1.0) > _ROW_SUM_TOL
    if bad.any():
        task, s, a = np.argwhere(bad)[0]
        raise ValueError(f"the task table for 'tabular-mdp' has transition probabilities "
                         f"p_s{s}_a{a}_to* in row {task} summing to {sums[task, s, a]:.6g}; "
                         "each (state, action) row must sum to 1")
    return means, probs / sums[..., None]


class TabularMDPEnv(TaskVectorEnv):
    """Batched random tabular MDPs: one-hot state observations, integer actions.

    ``reset(seed=...)`` seeds one ``torch.Generator`` per task from the first seed of that
    task's episodes (``env_seeds(seed)[task * episodes_per_task]``); every step draws that
    task's reward noise and then its transition uniforms from it, batched over its episodes.
    ``reset(seed=None)`` keeps the generators' current state (fresh random ones on the first
    reset), as gymnasium does.
    """

    def __init__(self, tasks: pd.DataFrame, episodes_per_task: int, horizon: int = 10,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 num_states: int = 10, num_actions: int = 5):
        self.num_states, self.num_actions = _check_sizes(num_states, num_actions)
        super().__init__(tasks, episodes_per_task, horizon, device, dtype)
        n, s = self.num_envs, self.num_states
        self.single_observation_space = spaces.Box(0.0, 1.0, (s,), np.float32)
        self.single_action_space = spaces.Discrete(self.num_actions)
        self.observation_space = spaces.Box(0.0, 1.0, (n, s), np.float32)
        self.action_space = spaces.MultiDiscrete(np.full(n, self.num_actions, dtype=np.int64))
        self.env_task = torch.arange(self.num_tasks, device=self.device).repeat_interleave(
            self.episodes_per_task)
        self.state = torch.zeros(n, dtype=torch.long, device=self.device)
        self.generators: list[torch.Generator] | None = None

    def _apply_tasks(self, tasks: pd.DataFrame) -> None:
        means, probs = _task_arrays(tasks, self.num_states, self.num_actions)
        self.mean_reward = torch.tensor(means, dtype=self.dtype, device=self.device)
        # Cumulative transition rows in float64 for inverse-CDF sampling: [tasks, S, A, S].
        self.transition_cdf = torch.tensor(probs, dtype=torch.float64,
                                           device=self.device).cumsum(dim=-1)

    def _observation(self) -> torch.Tensor:
        return torch.nn.functional.one_hot(self.state, self.num_states).to(self.dtype)

    def reset(self, *, seed: int | Sequence[int] | None = None,
              options: dict[str, Any] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        seeds = self.env_seeds(seed)
        if seed is not None or self.generators is None:
            generators = []
            for task in range(self.num_tasks):
                g = torch.Generator(device=self.device)
                task_seed = seeds[task * self.episodes_per_task]
                if task_seed is None:
                    g.seed()
                else:
                    g.manual_seed(int(task_seed))
                generators.append(g)
            self.generators = generators
        self.state.zero_()
        return self._observation(), {}

    def _actions(self, actions: torch.Tensor) -> torch.Tensor:
        actions = torch.as_tensor(actions, device=self.device)
        if actions.shape == (self.num_envs, 1):
            actions = actions.squeeze(-1)
        if actions.shape != (self.num_envs,):
            raise ValueError(f"actions must be action indices of shape ({self.num_envs},) or "
                             f"({self.num_envs}, 1), got {tuple(actions.shape)}")
        if actions.dtype == torch.bool or actions.is_complex():
            raise ValueError(f"actions must be integer action indices, got dtype {actions.dtype}")
        if actions.is_floating_point():
            if not torch.equal(actions, actions.round()):
                raise ValueError("actions must be integer action indices; got non-integral "
                                 "floating-point values (pass a LongTensor)")
        actions = actions.long()
        if ((actions < 0) | (actions >= self.num_actions)).any():
            raise ValueError(f"actions must be in [0, {self.num_actions - 1}], got values from "
                             f"{int(actions.min())} to {int(actions.max())}")
        return actions

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor, dict[str, Any]]:
        if self.generators is None:
            raise RuntimeError("TabularMDPEnv.step was called before reset(); call reset() first")
        actions = self._actions(actions)
        e = self.episodes_per_task
        noise, uniform = [], []
        for g in self.generators:  # one draw per task, batched over its episodes
            noise.append(torch.randn(e, generator=g, device=self.device, dtype=self.dtype))
            uniform.append(torch.rand(e, generator=g, device=self.device, dtype=torch.float64))
        noise_t = torch.cat(noise)
        uniform_t = torch.cat(uniform)
        reward = self.mean_reward[self.env_task, self.state, actions] + noise_t
        cdf = self.transition_cdf[self.env_task, self.state, actions]  # [num_envs, S]
        next_state = (uniform_t.unsqueeze(-1) >= cdf).sum(dim=-1)
        self.state = next_state.clamp_(max=self.num_states - 1)
        terminated = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        truncated = torch.zeros_like(terminated)
        return self._observation(), reward, terminated, truncated, {}


@register_task_family
class TabularMDP(TaskFamily):
    """Random tabular MDPs; options ``num_states`` (default 10) and ``num_actions`` (5).

    ``task_params``, ``observation_dim`` and ``num_actions`` are set per instance from the
    options (the class attributes give the defaults).
    """

    name = "tabular-mdp"
    gym_id = "TabularMDP"
    discrete = True
    default_horizon = 10
    num_actions = 5
    observation_dim = 10
    task_params = (*mean_reward_columns(10, 5), *transition_columns(10, 5))

    def __init__(self, num_states: int = 10, num_actions: int = 5):
        self.num_states, self.num_actions = _check_sizes(num_states, num_actions)
        self.observation_dim = self.num_states
        self.task_params = (*mean_reward_columns(self.num_states, self.num_actions),
                            *transition_columns(self.num_states, self.num_actions))

    def sample_tasks(self, n: int, rng: np.random.Generator) -> pd.DataFrame:
        s, a = self.num_states, self.num_actions
        if n < 1:
            raise ValueError(f"number of tasks must be >= 1, got {n}")
        means = rng.normal(1.0, 1.0, size=(n, s, a))
        probs = rng.dirichlet(np.ones(s), size=(n, s, a))
        return self.tasks_from_arrays(means, probs)

    def tasks_from_arrays(self, mean_rewards: np.ndarray | torch.Tensor,
                          transitions: np.ndarray | torch.Tensor) -> pd.DataFrame:
        """A task table from mean rewards [n, S, A] and transition rows [n, S, A, S].

        Task ids are ``0..n-1``; the table is checked (row sums, signs) like any other.
        """
        s, a = self.num_states, self.num_actions
        means = np.asarray(mean_rewards, dtype=np.float64)
        probs = np.asarray(transitions, dtype=np.float64)
        if means.ndim != 3 or means.shape[1:] != (s, a):
            raise ValueError(f"mean_rewards must have shape [n, {s}, {a}], got {means.shape}")
        n = means.shape[0]
        if probs.shape != (n, s, a, s):
            raise ValueError(f"transitions must have shape [{n}, {s}, {a}, {s}], got "
                             f"{probs.shape}")
        columns = dict(zip(mean_reward_columns(s, a), means.reshape(n, -1).T, strict=True))
        columns.update(zip(transition_columns(s, a), probs.reshape(n, -1).T, strict=True))
        table = self._table(n, columns)
        _task_arrays(table, s, a)
        return table

    def task_arrays(self, tasks: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Mean rewards [n, S, A] and transitions [n, S, A, S] (float64) of a task table."""
        return _task_arrays(tasks, self.num_states, self.num_actions)

    def validate_tasks(self, tasks: pd.DataFrame) -> pd.DataFrame:
        _task_arrays(tasks, self.num_states, self.num_actions)
        return super().validate_tasks(tasks)

    def make_env(self, tasks: pd.DataFrame, episodes_per_task: int, horizon: int | None = None,
                 device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> TabularMDPEnv:
        return TabularMDPEnv(self.validate_tasks(tasks), episodes_per_task,
                             horizon or self.default_horizon, device, dtype,
                             self.num_states, self.num_actions)


__all__ = ["TabularMDP", "TabularMDPEnv", "mean_reward_columns", "transition_columns"]
