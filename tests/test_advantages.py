"""Returns, GAE, normalization and the linear feature baseline against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maml_core.advantages import (
    baseline_features,
    compute_advantages,
    discounted_returns,
    fit_linear_baseline,
    gae,
    normalize,
    process_episodes,
)
from maml_core.episodes import Episodes

torch.set_num_threads(1)
D = torch.float64


def _t(x):
    return torch.tensor(x, dtype=D)


# Two episodes of T = 4 (one task): the second ends after step 1; the numbers it holds after
# the end (5, 7 and 9s) must not leak into anything.
REWARDS = _t([[[1.0, 1.0]], [[2.0, -1.0]], [[3.0, 5.0]], [[4.0, 7.0]]])  # [T, N, E]
MASKS = _t([[[1.0, 1.0]], [[1.0, 1.0]], [[1.0, 0.0]], [[1.0, 0.0]]])
VALUES = _t([[[0.5, 1.0]], [[1.0, 2.0]], [[-1.0, 9.0]], [[2.0, 9.0]]])


def test_discounted_returns_by_hand():
    g = discounted_returns(REWARDS, MASKS, gamma=0.5)
    # episode 0: G3 = 4, G2 = 3 + .5*4 = 5, G1 = 2 + .5*5 = 4.5, G0 = 1 + .5*4.5 = 3.25
    # episode 1: G1 = -1, G0 = 1 + .5*(-1) = 0.5, then 0 after the end
    expected = _t([[[3.25, 0.5]], [[4.5, -1.0]], [[5.0, 0.0]], [[4.0, 0.0]]])
    torch.testing.assert_close(g, expected, rtol=0, atol=1e-12)


def test_gae_by_hand():
    a = gae(REWARDS, VALUES, MASKS, gamma=0.5, lam=0.8)
    # episode 0: deltas 1 + .5*1 - .5 = 1, 2 + .5*(-1) - 1 = .5, 3 + .5*2 + 1 = 5, 4 - 2 = 2
    #   A3 = 2, A2 = 5 + .4*2 = 5.8, A1 = .5 + .4*5.8 = 2.82, A0 = 1 + .4*2.82 = 2.128
    # episode 1: deltas 1 + .5*2 - 1 = 1, -1 + 0 - 2 = -3 (no value after the last step)
    #   A1 = -3, A0 = 1 + .4*(-3) = -0.2
    expected = _t([[[2.128, -0.2]], [[2.82, -3.0]], [[5.8, 0.0]], [[2.0, 0.0]]])
    torch.testing.assert_close(a, expected, rtol=0, atol=1e-12)


def _loop_returns(r, m, gamma):
    out = np.zeros_like(r)
    for j in range(r.shape[1]):
        acc = 0.0
        for t in reversed(range(r.shape[0])):
            acc = (r[t, j] + gamma * acc) * m[t, j]
            out[t, j] = acc
    return out


def _loop_gae(r, v, m, gamma, lam):
    out = np.zeros_like(r)
    for j in range(r.shape[1]):
        acc, next_v = 0.0, 0.0
        for t in reversed(range(r.shape[0])):
            if m[t, j] == 0:
                acc, next_v = 0.0, 0.0
                continue
            delta = r[t, j] + gamma * next_v - v[t, j]
            acc = delta + gamma * lam * acc
            out[t, j], next_v = acc, v[t, j]
    return out


def _random_batch(seed, t=25, n=3, e=4):
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(t, n, e))
    v = rng.normal(size=(t, n, e))
    lengths = rng.integers(1, t + 1, size=(n, e))
    lengths[0, 0] = t
    m = (np.arange(t)[:, None, None] < lengths[None]).astype(np.float64)
    return r, v, m


@pytest.mark.parametrize("gamma,lam", [(0.99, 1.0), (0.9, 0.95), (0.7, 0.0)])
def test_returns_and_gae_against_a_loop(gamma, lam):
    r, v, m = _random_batch(1)
    flat = (r.shape[0], -1)
    g = discounted_returns(_t(r), _t(m), gamma)
    np.testing.assert_allclose(g.numpy(), _loop_returns(r.reshape(flat), m.reshape(flat), gamma)
                               .reshape(r.shape), rtol=1e-10, atol=1e-10)
    a = gae(_t(r), _t(v), _t(m), gamma, lam)
    np.testing.assert_allclose(a.numpy(), _loop_gae(r.reshape(flat), v.reshape(flat),
                                                    m.reshape(flat), gamma, lam).reshape(r.shape),
                               rtol=1e-10, atol=1e-10)
    if lam == 1.0:  # GAE(1) is the return minus the baseline
        np.testing.assert_allclose(a.numpy(), (g.numpy() - v) * m, rtol=1e-10, atol=1e-10)


def test_normalize_against_numpy():
    x, _, m = _random_batch(2)
    x = 3.0 + 2.0 * x
    out = normalize(_t(x), _t(m), dims=(0, 2)).numpy()
    for i in range(x.shape[1]):
        valid = m[:, i] > 0
        vals = x[:, i][valid]
        expected = (vals - vals.mean()) / (vals.std() + 1e-8)
        np.testing.assert_allclose(out[:, i][valid], expected, rtol=1e-10, atol=1e-10)
        assert np.all(out[:, i][~valid] == 0)
        assert abs(out[:, i][valid].mean()) < 1e-10
        assert abs(out[:, i][valid].std() - 1) < 1e-6


def test_baseline_features_by_hand():
    obs = _t([[[[0.5, -20.0]]], [[[2.0, 3.0]]], [[[1.0, 1.0]]]])  # [T=3, N=1, E=1, 2]
    masks = _t([[[1.0]], [[1.0]], [[0.0]]])
    f = baseline_features(obs, masks)[:, 0, 0]
    # [o (clipped to +-10), o^2, t, t^2, t^3, 1] with t = step / 100; zero where masked
    expected = _t([[0.5, -10.0, 0.25, 100.0, 0.0, 0.0, 0.0, 1.0],
                   [2.0, 3.0, 4.0, 9.0, 0.01, 1e-4, 1e-6, 1.0],
                   [0.0] * 8])
    torch.testing.assert_close(f, expected, rtol=1e-12, atol=1e-15)


def _design(seed, t=30, n=3, e=4, f=5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(t, n, e, f))
    w = rng.normal(size=(n, f))
    lengths = rng.integers(5, t + 1, size=(n, e))
    m = (np.arange(t)[:, None, None] < lengths[None]).astype(np.float64)
    y = np.einsum("tnef,nf->tne", x, w)
    return x, y, m, w


def test_linear_baseline_recovers_a_linear_target():
    x, y, m, w = _design(3)
    # Entries after the end of an episode are garbage and must be ignored.
    x = np.where(m[..., None] > 0, x, 1e3)
    y = np.where(m > 0, y, -1e3)
    weights = fit_linear_baseline(_t(x), _t(y), _t(m))
    assert weights.shape == w.shape
    np.testing.assert_allclose(weights.numpy(), w, rtol=0, atol=1e-5)


def test_linear_baseline_rank_deficient_design_falls_back_to_finite_weights():
    x, y, m, _ = _design(4)
    x[..., 2] = x[..., 1]  # duplicated feature
    x[..., 4] = 0.0  # feature that is always zero: X^T X is singular
    x[:, 0] = _design(5)[0][:, 0]  # ...except task 0, which stays well conditioned
    w = np.random.default_rng(6).normal(size=(3, 5))
    y = np.einsum("tnef,nf->tne", x, w)
    # reg = 0: the Cholesky factorization of the singular tasks fails every time (0 * 10 = 0),
    # so they take the pseudo-inverse; the regular task keeps its exact solution.
    weights = fit_linear_baseline(_t(x), _t(y), _t(m), reg=0.0).numpy()
    assert np.isfinite(weights).all()
    np.testing.assert_allclose(weights[0], w[0], rtol=0, atol=1e-8)
    fitted = np.einsum("tnef,nf->tne", x, weights) * m
    np.testing.assert_allclose(fitted, y * m, rtol=0, atol=1e-8)  # still fits exactly
    # Default regularization, badly scaled float32 design: finite, and a good fit.
    xs = (x * 1e4).astype(np.float32)
    ys = np.einsum("tnef,nf->tne", xs.astype(np.float64), w)
    weights = fit_linear_baseline(torch.tensor(xs), torch.tensor(ys, dtype=torch.float32),
                                  torch.tensor(m, dtype=torch.float32)).double().numpy()
    assert np.isfinite(weights).all()
    fitted = np.einsum("tnef,nf->tne", xs.astype(np.float64), weights) * m
    assert np.abs(fitted - ys * m).max() < 1e-3 * np.abs(ys).max()


def test_compute_advantages_end_to_end():
    r, _, m = _random_batch(7, t=20, n=2, e=3)
    rng = np.random.default_rng(8)
    obs = rng.normal(size=(20, 2, 3, 2)) * m[..., None]
    episodes = Episodes(observations=_t(obs), actions=_t(np.zeros((20, 2, 3, 2))),
                        rewards=_t(r * m), masks=_t(m))
    gamma = 0.95
    # Reference: discounted returns, ridge fit (1e-5) of the rllab features per task, GAE(1).
    g = _loop_returns((r * m).reshape(20, -1), m.reshape(20, -1), gamma).reshape(r.shape)
    tt = (np.arange(20) / 100.0)[:, None, None, None] * np.ones((20, 2, 3, 1))
    feats = np.concatenate([obs, obs**2, tt, tt**2, tt**3, np.ones_like(tt)], -1) * m[..., None]
    values = np.zeros_like(g)
    for i in range(2):
        xi, yi = feats[:, i].reshape(-1, 8), (g[:, i] * m[:, i]).reshape(-1)
        wi = np.linalg.solve(xi.T @ xi + 1e-5 * np.eye(8), xi.T @ yi)
        values[:, i] = feats[:, i] @ wi
    expected = (g - values) * m
    adv = compute_advantages(episodes, gamma, 1.0, normalize_advantages=False)
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-6, atol=1e-6)
    # process_episodes fills them in, normalized per task over time and episodes.
    out = process_episodes(episodes, gamma, 1.0).advantages.numpy()
    for i in range(2):
        valid = m[:, i] > 0
        vals = expected[:, i][valid]
        np.testing.assert_allclose(out[:, i][valid], (vals - vals.mean()) / (vals.std() + 1e-8),
                                   rtol=1e-5, atol=1e-5)
