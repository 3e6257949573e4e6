"""Returns, advantages and the linear feature baseline: pure, batched functions.

Every function takes tensors laid out [T, ...] (time first) with a mask of the same shape,
and treats each trailing position (task x episode) independently.
"""

from __future__ import annotations

import torch
from torch import Tensor

from maml_core.episodes import Episodes


def _discount_matrix(horizon: int, factor: float, like: Tensor) -> Tensor:
    """M[t, s] = factor ** (s - t) for s >= t, else 0 (upper triangular)."""
    t = torch.arange(horizon, device=like.device, dtype=like.dtype)
    power = t.unsqueeze(0) - t.unsqueeze(1)
    return torch.where(power >= 0, torch.as_tensor(factor, dtype=like.dtype,
                                                   device=like.device) ** power.clamp(min=0),
                       torch.zeros((), dtype=like.dtype, device=like.device))


def _discounted_sum(x: Tensor, factor: float) -> Tensor:
    """y_t = sum_{s >= t} factor^(s-t) x_s along dim 0, as one matrix product."""
    m = _discount_matrix(x.shape[0], factor, x)
    return (m @ x.reshape(x.shape[0], -1)).reshape(x.shape)


def discounted_returns(rewards: Tensor, masks: Tensor, gamma: float) -> Tensor:
    """Reward-to-go G_t = sum_{s >= t} gamma^(s-t) r_s over the valid steps; 0 where masked."""
    return _discounted_sum(rewards * masks, gamma) * masks


def gae(rewards: Tensor, values: Tensor, masks: Tensor, gamma: float, lam: float) -> Tensor:
    """Generalized advantage estimation (Schulman et al. 2016).

    ``values[t]`` estimates the value of the state at step t. The value after the last valid
    step is taken as 0 (episode ended or horizon reached, as in the paper's code).
    """
    values = values * masks
    next_values = torch.cat([values[1:], torch.zeros_like(values[:1])]) * torch.cat(
        [masks[1:], torch.zeros_like(masks[:1])])
    deltas = (rewards + gamma * next_values - values) * masks
    return _discounted_sum(deltas, gamma * lam) * masks


def normalize(x: Tensor, masks: Tensor, dims: tuple[int, ...], eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the valid entries along ``dims``; masked entries become 0."""
    count = masks.sum(dims, keepdim=True).clamp(min=1.0)
    mean = (x * masks).sum(dims, keepdim=True) / count
    var = ((x - mean).pow(2) * masks).sum(dims, keepdim=True) / count
    return (x - mean) / (var.sqrt() + eps) * masks


def baseline_features(observations: Tensor, masks: Tensor) -> Tensor:
    """rllab's linear-baseline features: [o, o^2, t, t^2, t^3, 1] with t = step / 100."""
    horizon = observations.shape[0]
    obs = observations.clamp(-10.0, 10.0)
    t = (torch.arange(horizon, device=obs.device, dtype=obs.dtype) / 100.0)
    t = t.view(horizon, *([1] * (obs.dim() - 1))).expand(*obs.shape[:-1], 1)
    ones = torch.ones_like(t)
    feats = torch.cat([obs, obs.pow(2), t, t.pow(2), t.pow(3), ones], dim=-1)
    return feats * masks.unsqueeze(-1)


def fit_linear_baseline(features: Tensor, targets: Tensor, masks: Tensor,
                        reg: float = 1e-5, attempts: int = 5) -> Tensor:
    """Ridge least squares per task. Inputs [T, N, E, F] / [T, N, E]; returns weights [N, F].

    Solved with a Cholesky factorization of (X^T X + reg I); a task whose system is ill-
    conditioned (failed factorization or non-finite result) is retried with reg x 10, up to
    ``attempts`` times, then solved by a least-squares pseudo-inverse.
    """
    n, f = features.shape[1], features.shape[-1]
    x = (features * masks.unsqueeze(-1)).transpose(0, 1).reshape(n, -1, f)
    y = (targets * masks).transpose(0, 1).reshape(n, -1, 1)
    xtx = x.transpose(1, 2) @ x
    xty = x.transpose(1, 2) @ y
    eye = torch.eye(f, dtype=x.dtype, device=x.device)
    weights = torch.full((n, f), float("nan"), dtype=x.dtype, device=x.device)
    pending = torch.ones(n, dtype=torch.bool, device=x.device)
    for _ in range(attempts):
        chol, info = torch.linalg.cholesky_ex(xtx[pending] + reg * eye)
        sol = torch.cholesky_solve(xty[pending], chol).squeeze(-1)
        good = (info == 0) & torch.isfinite(sol).all(-1)
        idx = pending.nonzero().squeeze(-1)
        weights[idx[good]] = sol[good]
        pending[idx[good]] = False
        if not pending.any():
            return weights
        reg *= 10.0
    weights[pending] = (torch.linalg.pinv(xtx[pending]) @ xty[pending]).squeeze(-1)
    return weights


def linear_baseline_values(observations: Tensor, returns: Tensor, masks: Tensor) -> Tensor:
    """Fit the baseline to the returns of each task and predict: [T, N, E]."""
    feats = baseline_features(observations, masks)
    weights = fit_linear_baseline(feats, returns, masks)  # [N, F]
    return torch.einsum("tnef,nf->tne", feats, weights) * masks


def compute_advantages(episodes: Episodes, gamma: float, gae_lambda: float,
                       normalize_advantages: bool = True) -> Tensor:
    """Advantages [T, N, E]: GAE on a per-task linear baseline fitted to discounted returns."""
    returns = discounted_returns(episodes.rewards, episodes.masks, gamma)
    values = linear_baseline_values(episodes.observations, returns, episodes.masks)
    adv = gae(episodes.rewards, values, episodes.masks, gamma, gae_lambda)
    if normalize_advantages:
        adv = normalize(adv, episodes.masks, dims=(0, 2))
    return adv


def process_episodes(episodes: Episodes, gamma: float, gae_lambda: float,
                     normalize_advantages: bool = True) -> Episodes:
    """``episodes`` with ``advantages`` filled in (no gradient flows through them)."""
    with torch.no_grad():
        episodes.advantages = compute_advantages(episodes, gamma, gae_lambda,
                                                 normalize_advantages)
    return episodes
