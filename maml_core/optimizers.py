"""Meta-optimizers: Adam/SGD on the meta-gradient, TRPO as in the paper, ProMP-style clipping.

Each takes the meta-parameters (a dict of leaf tensors, updated in place) and a
``MetaObjective``; ``step`` returns statistics. An update whose gradient is not finite, or a TRPO
line search that finds no acceptable step, is *rejected*: the parameters stay as they were and
``stats["rejected"]`` is 1. Optimizer state round-trips through ``state_dict`` as tensors (for
safetensors) plus JSON-able scalars.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from maml_core.adaptation import STEP_SIZE_PREFIX
from maml_core.meta_objective import MetaObjective, ObjectiveValue
from maml_core.policies import Params


def flat(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector: Tensor, like: Params) -> Params:
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vector[i:i + v.numel()].view_as(v)
        i += v.numel()
    return out


def conjugate_gradient(hvp: Callable[[Tensor], Tensor], b: Tensor, iters: int,
                       residual_tol: float = 1e-10) -> Tensor:
    """Solve H x = b for symmetric positive-definite H given only x -> H x."""
    return _conjugate_gradient(hvp, b, iters, residual_tol)[0]


def _conjugate_gradient(hvp: Callable[[Tensor], Tensor], b: Tensor, iters: int,
                        residual_tol: float = 1e-10) -> tuple[Tensor, Tensor]:
    """``conjugate_gradient``, also returning ``H x``.

    ``x = sum_k alpha_k p_k``, so by linearity ``H x = sum_k alpha_k H p_k`` is accumulated from
    the products the iterations compute anyway (no extra Hessian-vector product, and no
    reliance on the conjugacy of the directions).
    """
    x = torch.zeros_like(b)
    hx = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rdotr = r @ r
    for _ in range(iters):
        z = hvp(p)
        alpha = rdotr / (p @ z)
        x = x + alpha * p
        hx = hx + alpha * z
        r = r - alpha * z
        new_rdotr = r @ r
        if new_rdotr < residual_tol:
            break
        p = r + (new_rdotr / rdotr) * p
        rdotr = new_rdotr
    return x, hx


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all())


class MetaOptimizer:
    name = "base"

    def __init__(self, meta_params: Params, config):
        self.params = meta_params
        self.config = config

    def step(self, objective: MetaObjective) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> tuple[dict[str, Tensor], dict]:
        return {}, {}

    def load_state_dict(self, tensors: dict[str, Tensor], meta: dict) -> None:
        pass


class GradientMetaOptimizer(MetaOptimizer):
    """theta <- theta + beta * grad (Adam or plain SGD) on the policy-gradient meta-objective."""

    def __init__(self, meta_params: Params, config):
        super().__init__(meta_params, config)
        self.name = config.name
        cls = torch.optim.Adam if config.name == "adam" else torch.optim.SGD
        self.torch_optimizer = cls(list(meta_params.values()), lr=config.lr)

    def apply_loss(self, value_loss: Tensor) -> dict[str, float]:
        return self.apply_grads(torch.autograd.grad(value_loss, list(self.params.values())))

    def apply_grads(self, grads) -> dict[str, float]:
        """One step on the given gradients of the loss (one per parameter, in order); a
        gradient that is not finite is rejected."""
        params = list(self.params.values())
        gnorm = flat(grads).norm()
        if not _finite(gnorm):
            return {"grad_norm": float(gnorm), "rejected": 1.0}
        if self.config.max_grad_norm is not None and gnorm > self.config.max_grad_norm:
            grads = [g * (self.config.max_grad_norm / gnorm) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g
        self.torch_optimizer.step()
        self.torch_optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(gnorm), "rejected": 0.0}

    def step(self, objective: MetaObjective) -> dict[str, float]:
        value = objective(self.params, kind="pg", with_kl=False)
        stats = self.apply_loss(value.loss)
        return {"meta_loss": float(value.loss.detach()), **stats}

    def state_dict(self):
        tensors, meta = {}, {"steps": {}}
        state = self.torch_optimizer.state_dict()
        for idx, entry in state["state"].items():
            for key, value in entry.items():
                if torch.is_tensor(value):
                    tensors[f"{idx}.{key}"] = value.detach().clone()
                else:
                    meta["steps"][f"{idx}.{key}"] = value
        return tensors, meta

    def load_state_dict(self, tensors, meta):
        state = self.torch_optimizer.state_dict()
        entries: dict[int, dict] = {}
        for name, value in tensors.items():
            idx, key = name.split(".", 1)
            entries.setdefault(int(idx), {})[key] = value.clone()
        for name, value in meta.get("steps", {}).items():
            idx, key = name.split(".", 1)
            entries.setdefault(int(idx), {})[key] = value
        state["state"] = entries
        self.torch_optimizer.load_state_dict(state)


class TRPOMetaOptimizer(MetaOptimizer):
    """TRPO on the meta-objective (the paper): natural gradient by conjugate gradient on
    Hessian-vector products of the KL (through the inner steps), max-KL step, backtracking.

    With ``step_size_lr``, learned step sizes (``step_size.*``) are left out of TRPO's step --
    whose KL bound gives them little room, since the KL of the adapted policies barely
    depends on them at the old policy -- and take an Adam step of their own on the gradient of
    the same surrogate, computed in the same backward pass, after TRPO's step; with
    ``step_size_min`` as well, each Adam step is projected onto sizes at or above that floor."""

    name = "trpo"
    # Exact Hessian-vector products from chained one-step products (see
    # MetaObjective.kl_hessian_product); False takes plain double backward (bench/kl_hvp.py).
    structured_hvp = True

    def __init__(self, meta_params: Params, config, step_size_lr: float | None = None,
                 step_size_min: float | None = None):
        super().__init__(meta_params, config)
        if step_size_min is not None and step_size_lr is None:
            raise ValueError("step_size_min floors the learned step sizes' own Adam step: give "
                             "step_size_lr with it, or leave step_size_min out")
        self.step_size_min = step_size_min
        sizes = ({k: v for k, v in meta_params.items() if k.startswith(STEP_SIZE_PREFIX)}
                 if step_size_lr is not None else {})
        if step_size_lr is not None and not sizes:
            raise ValueError("step_size_lr updates learned step sizes, but the meta-parameters "
                             "have none: set inner.learn_step_size: true")
        # What TRPO steps: the policy, and the step sizes unless they have their own optimizer.
        self.trpo_params = {k: v for k, v in meta_params.items() if k not in sizes}
        self.size_optimizer = (GradientMetaOptimizer(sizes, config.model_copy(update={
            "name": "adam", "lr": step_size_lr, "max_grad_norm": None})) if sizes else None)

    def step(self, objective: MetaObjective) -> dict[str, float]:
        stats, size_grads = self._trpo_step(objective)
        if size_grads:
            size_stats = self.size_optimizer.apply_grads(size_grads)
            stats["step_size_grad_norm"] = size_stats["grad_norm"]
            stats["step_size_rejected"] = size_stats["rejected"]
            with torch.no_grad():
                if self.step_size_min is not None:
                    for v in self.size_optimizer.params.values():
                        v.clamp_(min=self.step_size_min)
                values = flat(list(self.size_optimizer.params.values()))
            stats.update(step_size_min=float(values.min()), step_size_mean=float(values.mean()),
                         step_size_max=float(values.max()))
        return stats

    def _trpo_step(self, objective: MetaObjective) -> tuple[dict[str, float], list[Tensor]]:
        """TRPO's step on ``trpo_params``: its statistics, and the surrogate's gradient in the
        step sizes that have an optimizer of their own (empty if none, or if TRPO found no
        finite direction)."""
        cfg = self.config
        params = list(self.trpo_params.values())
        sizes = list(self.size_optimizer.params.values()) if self.size_optimizer else []
        # One adaptation and forward pass give the old policies, the surrogate and its KL.
        value = objective.at_old_policy(self.params, kind="surrogate")
        loss_before = value.loss.detach()
        exact = cfg.hvp_subsample >= 1.0
        grads = torch.autograd.grad(value.loss, params + sizes, retain_graph=exact)
        grads, size_grads = grads[:len(params)], list(grads[len(params):])
        g = flat(grads)
        gnorm = g.norm()

        def rejected(line_search_steps: int) -> dict[str, float]:
            return {"meta_loss": float(loss_before), "grad_norm": float(gnorm),
                    "kl": float("nan"), "rejected": 1.0,
                    "line_search_steps": float(line_search_steps)}

        if not _finite(g):
            return rejected(0), []
        hvp = self._kl_hvp(objective, value if exact else None)
        del value
        direction, h_direction = _conjugate_gradient(hvp, -g, cfg.cg_iters)
        del hvp  # free the graphs before the line search
        shs = 0.5 * (direction @ h_direction)
        if not (_finite(direction) and shs > 0):
            return rejected(0), []
        full_step = direction * torch.sqrt(2.0 * cfg.max_kl / (2.0 * shs))
        old = [p.detach().clone() for p in params]
        for i in range(cfg.line_search_steps):
            frac = cfg.line_search_backtrack ** i
            with torch.no_grad():
                for p, o, s in zip(params, old, unflat(full_step, self.trpo_params).values()):
                    p.copy_(o + frac * s)
            with torch.no_grad():  # (the inner step enables gradients where it needs them)
                trial = objective({k: v.detach() for k, v in self.params.items()},
                                  kind="surrogate", with_kl=True)
            loss, kl_new = float(trial.loss), float(trial.kl)
            if math.isfinite(loss) and loss < float(loss_before) and kl_new <= cfg.max_kl:
                return {"meta_loss": float(loss_before), "meta_loss_after": loss,
                        "grad_norm": float(gnorm), "kl": kl_new, "rejected": 0.0,
                        "line_search_steps": float(i + 1)}, size_grads
        with torch.no_grad():
            for p, o in zip(params, old):
                p.copy_(o)
        return rejected(cfg.line_search_steps), size_grads

    def state_dict(self) -> tuple[dict[str, Tensor], dict]:
        """The step sizes' Adam state, when they have their own optimizer (TRPO keeps none)."""
        if self.size_optimizer is None:
            return {}, {}
        tensors, meta = self.size_optimizer.state_dict()
        return ({self._SIZE_STATE + k: v for k, v in tensors.items()},
                {self._SIZE_STATE.rstrip("."): meta})

    def load_state_dict(self, tensors: dict[str, Tensor], meta: dict) -> None:
        if self.size_optimizer is not None:
            n = len(self._SIZE_STATE)
            self.size_optimizer.load_state_dict(
                {k[n:]: v for k, v in tensors.items() if k.startswith(self._SIZE_STATE)},
                meta.get(self._SIZE_STATE.rstrip("."), {}))

    _SIZE_STATE = "step_size_adam."

    def _kl_hvp(self, objective: MetaObjective, value: ObjectiveValue | None
                ) -> Callable[[Tensor], Tensor]:
        """Damped KL Hessian-vector product on flat vectors: exact (all tasks, from ``value``),
        or on the first ``hvp_subsample`` fraction of the tasks when ``value`` is None."""
        cfg = self.config
        if value is not None:
            kl_hvp = objective.kl_hessian_product(self.trpo_params, value, self.structured_hvp)

            def hvp(v: Tensor) -> Tensor:
                return (flat(kl_hvp(list(unflat(v, self.trpo_params).values())))
                        + cfg.cg_damping * v)

            return hvp
        params = list(self.trpo_params.values())
        n = objective.batch.pre.num_tasks
        k = max(1, math.ceil(cfg.hvp_subsample * n))
        kl = objective.kl_on_tasks(self.params, torch.arange(k))
        grad_kl = flat(torch.autograd.grad(kl, params, create_graph=True))

        def subsampled(v: Tensor) -> Tensor:
            hv = torch.autograd.grad(grad_kl @ v, params, retain_graph=True)
            return flat(hv) + cfg.cg_damping * v

        return subsampled


class ProMPMetaOptimizer(GradientMetaOptimizer):
    """Several Adam epochs on the clipped surrogate of the post-adaptation policies."""

    def __init__(self, meta_params: Params, config):
        super().__init__(meta_params, config.model_copy(update={"name": "adam"}))
        self.name = "promp"

    def step(self, objective: MetaObjective) -> dict[str, float]:
        first, stats = None, {}
        for epoch in range(self.config.epochs):
            if epoch == 0:  # the old policies come from the first epoch's own forward pass
                value = objective.at_old_policy(self.params, kind="clipped",
                                                clip_eps=self.config.clip_eps)
            else:
                value = objective(self.params, kind="clipped", clip_eps=self.config.clip_eps,
                                  with_kl=False)
            first = float(value.loss.detach()) if first is None else first
            stats = self.apply_loss(value.loss)
            if stats["rejected"]:
                break
        with torch.no_grad():
            after = objective({k: v.detach() for k, v in self.params.items()}, kind="clipped",
                              clip_eps=self.config.clip_eps, with_kl=True)
        return {"meta_loss": first, "meta_loss_after": float(after.loss), "kl": float(after.kl),
                **stats}


def make_meta_optimizer(meta_params: Params, config, step_size_lr: float | None = None,
                        step_size_min: float | None = None) -> MetaOptimizer:
    """The meta-optimizer ``config`` names; ``step_size_lr`` (TRPO only) gives learned step
    sizes an Adam step of their own, ``step_size_min`` a floor for it."""
    if step_size_lr is not None and config.name != "trpo":
        raise ValueError(f"step_size_lr updates learned step sizes apart from TRPO; "
                         f"meta-optimizer {config.name!r} updates them with the policy: "
                         "leave step_size_lr out")
    if config.name in ("adam", "sgd"):
        return GradientMetaOptimizer(meta_params, config)
    if config.name == "trpo":
        return TRPOMetaOptimizer(meta_params, config, step_size_lr, step_size_min)
    if config.name == "promp":
        return ProMPMetaOptimizer(meta_params, config)
    raise ValueError(f"unknown meta-optimizer {config.name!r}; choose adam, sgd, trpo or promp")
