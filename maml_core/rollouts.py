"""Rollout collection for a batch of tasks, with one parameter set or one per task.

Randomness is drawn per task from that task's seed (policy noise and environment resets), so
the random draws of a task do not depend on which other tasks are in the batch. Bit-for-bit
equality of a shard with the full batch also needs the policy evaluated on the same batch
shape: BLAS may round a product over 9 rows differently from the same rows inside 15, and
MuJoCo amplifies a last-bit difference in an action. ``flows.scale_out`` therefore runs the
policy on the full batch shape and shards only the environments.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import Tensor

from maml_core.allocator import tune_allocator
from maml_core.episodes import Episodes
from maml_core.policies import Params
from maml_core.seeding import derive_seed, generator
from maml_core.tasks.base import TaskFamily, TaskVectorEnv


class EnvPool:
    """Keeps batched environments alive between calls (building MuJoCo models is slow)."""

    def __init__(self, family: TaskFamily, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.family, self.device, self.dtype = family, device, dtype
        self._envs: dict[tuple[int, int, int], TaskVectorEnv] = {}

    def get(self, tasks: pd.DataFrame, episodes_per_task: int, horizon: int) -> TaskVectorEnv:
        key = (len(tasks), int(episodes_per_task), int(horizon))
        env = self._envs.get(key)
        if env is None:
            env = self.family.make_env(tasks, episodes_per_task, horizon, self.device,
                                       self.dtype)
            self._envs[key] = env
        else:
            env.set_tasks(self.family.validate_tasks(tasks))
        return env

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()


def collect_episodes(env: TaskVectorEnv, policy, params: Params, seeds: list[int],
                     horizon: int | None = None) -> Episodes:
    """Run ``policy`` with ``params`` (shared, or batched with one set per task) in ``env``.

    ``seeds`` holds one seed per task; each task's action noise and reset seeds derive from it.
    Returns episodes of shape [T, N, E, ...].
    """
    tune_allocator()
    n, e = env.num_tasks, env.episodes_per_task
    if len(seeds) != n:
        raise ValueError(f"collect_episodes needs one seed per task ({n}), got {len(seeds)}")
    horizon = int(horizon or env.horizon)
    device = env.device
    params = {k: v.detach().to(device) for k, v in params.items()}
    batched = params["layers.0.weight"].dim() == 3
    if batched and params["layers.0.weight"].shape[0] != n:
        raise ValueError(f"got parameters for {params['layers.0.weight'].shape[0]} tasks "
                         f"but the environment holds {n} tasks")
    # Per-task noise for every step, drawn up front: [T, N, E, ...].
    noise = torch.stack([policy.noise((horizon, e), generator(derive_seed(s, "actions")))
                         for s in seeds], dim=1).to(device=device)
    if not policy.discrete:
        noise = noise.to(env.dtype)
    obs, _ = env.reset(seed=[derive_seed(s, "reset") for s in seeds])
    obs_buf, act_buf, rew_buf, mask_buf = [], [], [], []
    alive = torch.ones(n * e, dtype=env.dtype, device=device)
    with torch.no_grad():
        for t in range(horizon):
            o = obs.view(n, e, -1)
            dist = policy.distribution(params, o if batched else o.reshape(n * e, -1))
            if not batched:
                dist = tuple(d.view(n, e, *d.shape[1:]) for d in dist)
            action = policy.sample_with(dist, noise[t])
            flat_action = action.reshape(n * e, *action.shape[2:])
            next_obs, reward, terminated, truncated, _ = env.step(flat_action)
            obs_buf.append(o)
            act_buf.append(action)
            rew_buf.append(reward.view(n, e) * alive.view(n, e))
            mask_buf.append(alive.view(n, e).clone())
            alive = alive * (~(terminated | truncated)).to(env.dtype)
            obs = next_obs
    return Episodes(observations=torch.stack(obs_buf), actions=torch.stack(act_buf),
                    rewards=torch.stack(rew_buf), masks=torch.stack(mask_buf))


def rollout_task_seeds(run_seed: int, iteration: int, stage: str, task_ids) -> list[int]:
    """Seeds for a rollout stage: one per task, from (run seed, iteration, stage, task id)."""
    return [derive_seed(run_seed, iteration, stage, int(t)) for t in task_ids]


def mean_return(episodes: Episodes) -> Tensor:
    return episodes.task_returns().mean()
