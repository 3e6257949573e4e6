"""Supervised MAML (sinusoid regression) on the same inner/outer machinery, MSE loss.

Each task gives K examples for the inner step(s) and K fresh examples for the meta-loss;
the paper's test protocol fine-tunes for up to 10 steps on K examples and reports the MSE on
held-out points of each of 600 test tasks.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import Tensor

from maml_core.adaptation import LossFn, adapt, split_meta_params
from maml_core.policies import Params
from maml_core.seeding import derive_seed, generator
from maml_core.tasks.base import TASK_ID


def mse_loss(model, x: Tensor, y: Tensor) -> LossFn:
    """Per-task MSE of ``model`` on [N, K, in] -> [N, K, out], for batched parameters."""
    def loss(params: Params) -> Tensor:
        return (model.net(params, x) - y).pow(2).mean(dim=(1, 2))

    return loss


def task_generators(seed: int, iteration: int | str, stage: str, tasks: pd.DataFrame):
    return [generator(derive_seed(seed, iteration, stage, int(t))) for t in tasks[TASK_ID]]


def sample_support_query(family, tasks: pd.DataFrame, k: int, seed: int, iteration: int | str,
                         device, dtype, query_k: int | None = None):
    """K support and K (or ``query_k``) query examples per task, drawn per task."""
    gens = task_generators(seed, iteration, "support", tasks)
    support = family.sample_batch(tasks, k, gens, device=device, dtype=dtype)
    gens = task_generators(seed, iteration, "query", tasks)
    query = family.sample_batch(tasks, query_k or k, gens, device=device, dtype=dtype)
    return support, query


def supervised_meta_loss(model, meta_params: Params, support, query, step_size: float,
                         num_steps: int, first_order: bool) -> tuple[Tensor, Tensor]:
    """Mean post-adaptation query MSE over tasks and the mean pre-adaptation support MSE."""
    theta, learned = split_meta_params(meta_params)
    phi, losses = adapt(theta, mse_loss(model, *support),
                        learned if learned is not None else step_size, num_steps,
                        first_order, num_tasks=support[0].shape[0])
    return mse_loss(model, *query)(phi).mean(), losses[0].mean()


def regression_curve(model, meta_params: Params, family, tasks: pd.DataFrame, k: int,
                     steps: int, step_size: float, seed: int, device="cpu",
                     dtype=torch.float32, num_test_points: int = 100) -> pd.DataFrame:
    """Per-task table ``task_id, step, mse``: fine-tune on K examples for 0..steps steps and
    measure the MSE on ``num_test_points`` fresh points (the paper's protocol)."""
    theta, learned = split_meta_params({k_: v.detach() for k_, v in meta_params.items()})
    support, query = sample_support_query(family, tasks, k, seed, "test", device, dtype,
                                          query_k=num_test_points)
    alpha = learned if learned is not None else step_size
    rows = []
    params, n = theta, len(tasks)
    ids = tasks[TASK_ID].to_numpy()
    for step in range(steps + 1):
        with torch.no_grad():
            batched = params["layers.0.weight"].dim() == 3
            p = params if batched else {k_: v.expand(n, *v.shape) for k_, v in params.items()}
            mse = mse_loss(model, *query)(p).cpu().numpy()
        rows.append(pd.DataFrame({TASK_ID: ids, "step": step, "mse": mse}))
        if step < steps:
            with torch.no_grad():
                params, _ = adapt(params, mse_loss(model, *support), alpha,
                                  num_tasks=None if batched else n)
    return pd.concat(rows, ignore_index=True)
