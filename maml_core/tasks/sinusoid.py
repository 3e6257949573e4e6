"""Sinusoid regression (Finn et al. 2017, section 5.1): a supervised task family.

A task is the function ``y = amplitude * sin(x - phase)`` with amplitude uniform in
[0.1, 5.0] and phase uniform in [0, pi]; inputs ``x`` are uniform in [-5, 5]. The family has
no environment (``kind = "supervised"``): ``sample_batch`` draws K labelled points per task and
``target`` evaluates the true functions, e.g. on a grid for plots or evaluation.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from maml_core.tasks.base import TaskFamily, register_task_family


@register_task_family
class Sinusoid(TaskFamily):
    """Sinusoids ``amplitude * sin(x - phase)``; options give the sampling ranges."""

    name = "sinusoid"
    kind = "supervised"
    task_params = ("amplitude", "phase")
    input_dim = 1
    output_dim = 1

    def __init__(self, amp_low: float = 0.1, amp_high: float = 5.0, phase_low: float = 0.0,
                 phase_high: float = math.pi, x_low: float = -5.0, x_high: float = 5.0):
        for label, low, high in (("amp", amp_low, amp_high), ("phase", phase_low, phase_high),
                                 ("x", x_low, x_high)):
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise ValueError(f"sinusoid needs finite {label}_low <= {label}_high, got "
                                 f"{label}_low={low}, {label}_high={high}")
        self.amp_low, self.amp_high = float(amp_low), float(amp_high)
        self.phase_low, self.phase_high = float(phase_low), float(phase_high)
        self.x_low, self.x_high = float(x_low), float(x_high)

    def sample_tasks(self, n: int, rng: np.random.Generator) -> pd.DataFrame:
        if n < 1:
            raise ValueError(f"number of tasks must be >= 1, got {n}")
        amplitude = rng.uniform(self.amp_low, self.amp_high, size=n)
        phase = rng.uniform(self.phase_low, self.phase_high, size=n)
        return self._table(n, {"amplitude": amplitude, "phase": phase})

    def _params(self, tasks: pd.DataFrame, device: str | torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Amplitudes and phases as [num_tasks, 1, 1] tensors."""
        tasks = self.validate_tasks(tasks)
        amplitude, phase = (
            torch.tensor(tasks[c].to_numpy(dtype=np.float64, copy=True), dtype=dtype,
                         device=device).view(-1, 1, 1) for c in ("amplitude", "phase"))
        return amplitude, phase

    def target(self, tasks: pd.DataFrame, x: torch.Tensor) -> torch.Tensor:
        """True values ``amplitude * sin(x - phase)``: [num_tasks, m, 1].

        ``x`` is [num_tasks, m, 1] (points per task) or [m, 1] (the same points for every task).
        """
        x = torch.as_tensor(x)
        if not x.is_floating_point():
            x = x.to(torch.get_default_dtype())
        amplitude, phase = self._params(tasks, x.device, x.dtype)
        num_tasks = amplitude.shape[0]
        if x.ndim == 2 and x.shape[-1] == 1:
            x = x.unsqueeze(0).expand(num_tasks, -1, -1)
        elif not (x.ndim == 3 and x.shape[0] == num_tasks and x.shape[-1] == 1):
            raise ValueError(f"x must have shape [{num_tasks}, m, 1] (per task) or [m, 1] "
                             f"(shared by all tasks), got {tuple(x.shape)}")
        return amplitude * torch.sin(x - phase)

    def sample_batch(self, tasks: pd.DataFrame, k: int,
                     generator: torch.Generator | list[torch.Generator],
                     device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``k`` points per task: x uniform in [x_low, x_high], y = target; each [num_tasks, k, 1].

        Pass one generator per task (a list) to make each task's draws independent of the
        others, so that a shard of tasks reproduces the same points; a single generator draws
        the whole batch at once. Draws are made on each generator's device in ``dtype``, then
        moved to ``device``.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k (points per task) must be an integer >= 1, got {k!r}")
        num_tasks = len(self.validate_tasks(tasks))
        k = int(k)
        if isinstance(generator, torch.Generator):
            u = torch.rand(num_tasks, k, 1, generator=generator, device=generator.device,
                           dtype=dtype).to(device)
        else:
            generators = list(generator)
            if len(generators) != num_tasks:
                raise ValueError(f"sample_batch got {len(generators)} generators for "
                                 f"{num_tasks} tasks; pass one generator per task or a single "
                                 "torch.Generator")
            if not all(isinstance(g, torch.Generator) for g in generators):
                raise ValueError("sample_batch needs torch.Generator objects as generators")
            u = torch.stack([torch.rand(k, 1, generator=g, device=g.device, dtype=dtype)
                             .to(device) for g in generators])
        x = self.x_low + (self.x_high - self.x_low) * u
        return x, self.target(tasks, x)


__all__ = ["Sinusoid"]
