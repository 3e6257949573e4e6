"""The episodes container: [time, task, episode, ...] tensors with masks.

``masks[t, i, e]`` is 1 while episode ``e`` of task ``i`` is running at step ``t`` (the step that
ends an episode still counts) and 0 afterwards, so every statistic is a masked sum.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass
class Episodes:
    observations: Tensor  # [T, N, E, obs_dim]
    actions: Tensor  # [T, N, E, act_dim] (float) or [T, N, E] (long, discrete)
    rewards: Tensor  # [T, N, E]
    masks: Tensor  # [T, N, E], float 0/1
    advantages: Tensor | None = None  # [T, N, E], filled by advantages.process_episodes

    def __post_init__(self):
        t, n, e = self.rewards.shape
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and tuple(value.shape[:3]) != (t, n, e):
                raise ValueError(f"Episodes.{f.name} has shape {tuple(value.shape)}; expected "
                                 f"[time, task, episode, ...] = [{t}, {n}, {e}, ...]")

    @property
    def horizon(self) -> int:
        return self.rewards.shape[0]

    @property
    def num_tasks(self) -> int:
        return self.rewards.shape[1]

    @property
    def episodes_per_task(self) -> int:
        return self.rewards.shape[2]

    @property
    def num_steps(self) -> int:
        """Environment steps actually taken (masked)."""
        return int(self.masks.sum().item())

    def episode_returns(self) -> Tensor:
        """Undiscounted return of every episode: [N, E]."""
        return (self.rewards * self.masks).sum(0)

    def task_returns(self) -> Tensor:
        """Mean undiscounted return per task: [N]."""
        return self.episode_returns().mean(-1)

    def task_major(self, name: str) -> Tensor:
        """``name`` laid out [N, T, E, ...] (task first), for per-task parameters."""
        return getattr(self, name).transpose(0, 1)

    def select_tasks(self, index: Tensor | list[int]) -> Episodes:
        index = torch.as_tensor(index, dtype=torch.long)
        return replace(self, **{f.name: getattr(self, f.name).index_select(1, index)
                                for f in fields(self) if getattr(self, f.name) is not None})

    def to(self, device: str | torch.device) -> Episodes:
        return replace(self, **{f.name: getattr(self, f.name).to(device)
                                for f in fields(self) if getattr(self, f.name) is not None})

    def to_tensors(self, prefix: str = "") -> dict[str, Tensor]:
        """Flat dict of tensors (for safetensors)."""
        return {prefix + f.name: getattr(self, f.name).contiguous()
                for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], prefix: str = "") -> Episodes:
        names = [f.name for f in fields(cls)]
        missing = [n for n in names[:4] if prefix + n not in tensors]
        if missing:
            raise ValueError(f"stored episodes lack tensor(s) {[prefix + n for n in missing]}")
        return cls(**{n: tensors[prefix + n] for n in names if prefix + n in tensors})

    @staticmethod
    def concat_tasks(parts: list[Episodes]) -> Episodes:
        """Join episodes of disjoint task shards along the task dimension."""
        out = {}
        for f in fields(Episodes):
            values = [getattr(p, f.name) for p in parts]
            out[f.name] = None if values[0] is None else torch.cat(values, dim=1)
        return Episodes(**out)
