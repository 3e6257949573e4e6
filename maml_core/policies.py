"""Functional MLP policies whose parameters may carry a leading task dimension.

A policy is an ``nn.Module`` (so ``torch.func.functional_call`` and ``state_dict`` work as usual),
but every method used by the algorithm takes the parameters explicitly as a dict. When the
parameters are *batched* (each tensor has an extra leading dimension of size ``num_tasks``), the
inputs carry the task dimension first (``[num_tasks, batch, features]``) and each task is
evaluated with its own parameters by batched matrix products -- this is what lets inner
adaptation and rollouts run for all tasks at once.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

Params = dict[str, Tensor]

ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}
_LOG_2PI = math.log(2.0 * math.pi)


def is_batched(params: Params, reference: Params) -> bool:
    """True if ``params`` carry a leading task dimension relative to ``reference`` shapes."""
    key = next(iter(reference))
    return params[key].dim() == reference[key].dim() + 1


class MLP(nn.Module):
    """A plain MLP evaluated functionally; hidden layers use ``activation``."""

    def __init__(self, input_dim: int, output_dim: int, hidden_sizes: Sequence[int] = (64, 64),
                 activation: str = "tanh"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of "
                             f"{sorted(ACTIVATIONS)}")
        sizes = [int(input_dim), *map(int, hidden_sizes), int(output_dim)]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.activation = activation
        self.input_dim, self.output_dim = int(input_dim), int(output_dim)
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Xavier-uniform weights and zero biases (the paper's initialization), seeded."""
        with torch.no_grad():
            for layer in self.layers:
                fan_out, fan_in = layer.weight.shape
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator)
                                   .mul_(2 * bound).sub_(bound))
                layer.bias.zero_()

    def net(self, params: Params, x: Tensor) -> Tensor:
        """The MLP's output with parameters ``params`` (batched: ``x`` is [tasks, B, in])."""
        act = ACTIVATIONS[self.activation]
        n = len(self.layers)
        batch_shape = None
        if params["layers.0.weight"].dim() == 3 and x.dim() != 3:
            batch_shape = x.shape[:-1]  # [tasks, ...] -> [tasks, B] for batched products
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        for i in range(n):
            w, b = params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]
            if w.dim() == 3:  # one parameter set per task
                x = torch.baddbmm(b.unsqueeze(-2), x, w.transpose(-1, -2))
            else:
                x = nn.functional.linear(x, w, b)
            if i < n - 1:
                x = act(x)
        return x if batch_shape is None else x.reshape(*batch_shape, x.shape[-1])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(dict(self.named_parameters()), x)

    def params(self) -> Params:
        """A detached copy of the module's parameters, as a dict."""
        return {k: v.detach().clone() for k, v in self.named_parameters()}

    def architecture(self) -> dict:
        return {"class": type(self).__name__, "input_dim": self.input_dim,
                "output_dim": self.output_dim, "hidden_sizes": list(self.hidden_sizes),
                "activation": self.activation}


class GaussianMLPPolicy(MLP):
    """Gaussian policy: MLP mean, state-independent log standard deviation."""

    discrete = False

    def __init__(self, observation_dim: int, action_dim: int,
                 hidden_sizes: Sequence[int] = (64, 64), activation: str = "tanh",
                 init_log_std: float = 0.0, min_log_std: float | None = None):
        super().__init__(observation_dim, action_dim, hidden_sizes, activation)
        self.init_log_std = float(init_log_std)
        # rllab's ``min_std``: the log std the distribution uses is max(log_std, min_log_std), so
        # neither the meta-update nor an inner step can shrink the exploration noise below it.
        self.min_log_std = None if min_log_std is None else float(min_log_std)
        self.log_std = nn.Parameter(torch.full((action_dim,), self.init_log_std))

    def reset_parameters(self, generator: torch.Generator) -> None:
        super().reset_parameters(generator)
        with torch.no_grad():
            self.log_std.fill_(self.init_log_std)

    def forward(self, obs: Tensor) -> Tensor:
        """The mean action (deterministic policy output)."""
        return self.net(dict(self.named_parameters()), obs)

    def distribution(self, params: Params, obs: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, log_std)``; log_std broadcast to the mean's shape."""
        mean = self.net(params, obs)
        log_std = params["log_std"]
        if log_std.dim() == 2:  # batched: [tasks, act] -> [tasks, 1.., act]
            log_std = log_std.view(log_std.shape[0], *([1] * (mean.dim() - 2)), -1)
        if self.min_log_std is not None:
            log_std = log_std.clamp(min=self.min_log_std)
        return mean, log_std.expand_as(mean)

    @staticmethod
    def log_prob_of(dist: tuple[Tensor, Tensor], actions: Tensor) -> Tensor:
        mean, log_std = dist
        z = (actions - mean) * torch.exp(-log_std)
        return (-0.5 * z.pow(2) - log_std - 0.5 * _LOG_2PI).sum(-1)

    @staticmethod
    def kl(old: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor]) -> Tensor:
        """KL(old || new) per state (summed over action dimensions)."""
        m0, s0 = old
        m1, s1 = new
        var0, var1 = torch.exp(2 * s0), torch.exp(2 * s1)
        return (s1 - s0 + (var0 + (m0 - m1).pow(2)) / (2 * var1) - 0.5).sum(-1)

    @staticmethod
    def entropy(dist: tuple[Tensor, Tensor]) -> Tensor:
        return (dist[1] + 0.5 * (1.0 + _LOG_2PI)).sum(-1)

    def noise(self, shape: Sequence[int], generator: torch.Generator) -> Tensor:
        """Standard normal noise for ``shape`` (batch dims) x action_dim."""
        return torch.randn((*shape, self.output_dim), generator=generator)

    def sample_with(self, dist: tuple[Tensor, Tensor], noise: Tensor) -> Tensor:
        mean, log_std = dist
        return mean + torch.exp(log_std) * noise

    def architecture(self) -> dict:
        arch = {**super().architecture(), "init_log_std": self.init_log_std}
        if self.min_log_std is not None:  # unbounded policies keep the manifests they always had
            arch["min_log_std"] = self.min_log_std
        return arch


class CategoricalMLPPolicy(MLP):
    """Categorical policy over ``num_actions`` discrete actions: MLP logits."""

    discrete = True

    def __init__(self, observation_dim: int, num_actions: int,
                 hidden_sizes: Sequence[int] = (64, 64), activation: str = "tanh"):
        super().__init__(observation_dim, num_actions, hidden_sizes, activation)

    def forward(self, obs: Tensor) -> Tensor:
        """The most likely action."""
        return self.net(dict(self.named_parameters()), obs).argmax(-1)

    def distribution(self, params: Params, obs: Tensor) -> tuple[Tensor]:
        return (torch.log_softmax(self.net(params, obs), dim=-1),)

    @staticmethod
    def log_prob_of(dist: tuple[Tensor], actions: Tensor) -> Tensor:
        return dist[0].gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def kl(old: tuple[Tensor], new: tuple[Tensor]) -> Tensor:
        return (old[0].exp() * (old[0] - new[0])).sum(-1)

    @staticmethod
    def entropy(dist: tuple[Tensor]) -> Tensor:
        return -(dist[0].exp() * dist[0]).sum(-1)

    def noise(self, shape: Sequence[int], generator: torch.Generator) -> Tensor:
        """Uniform noise in [0, 1) for inverse-CDF sampling, one number per action."""
        return torch.rand(tuple(shape), generator=generator)

    def sample_with(self, dist: tuple[Tensor], noise: Tensor) -> Tensor:
        cdf = dist[0].exp().cumsum(-1)
        idx = torch.searchsorted(cdf, (noise * cdf[..., -1]).unsqueeze(-1).contiguous())
        return idx.squeeze(-1).clamp_(max=self.output_dim - 1)


def log_prob(policy, params: Params, obs: Tensor, actions: Tensor) -> Tensor:
    return policy.log_prob_of(policy.distribution(params, obs), actions)


def build_policy(family, hidden_sizes: Sequence[int], activation: str, init_log_std: float,
                 generator: torch.Generator, min_log_std: float | None = None):
    """The policy (or regressor, for supervised families) that fits ``family``, initialized."""
    if family.kind == "supervised":
        model: MLP = MLP(family.input_dim, family.output_dim, hidden_sizes, activation)
    elif family.discrete:
        model = CategoricalMLPPolicy(family.observation_dim, family.num_actions, hidden_sizes,
                                     activation)
    else:
        model = GaussianMLPPolicy(family.observation_dim, family.action_dim, hidden_sizes,
                                  activation, init_log_std, min_log_std)
    model.reset_parameters(generator)
    return model
