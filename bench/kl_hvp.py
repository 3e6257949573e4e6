"""Benchmark TRPO's KL Hessian-vector products through the inner steps: chained one-step
products (the default) against plain double backward, on one batch of a config.

    python bench/kl_hvp.py --config configs/navigation2d-two-step.yaml
    python bench/kl_hvp.py --config configs/navigation2d-paper.yaml

Runs ``--warmup`` meta-iterations (to move theta away from its initialization), collects one
batch (pre-adaptation, later inner steps, post-adaptation episodes) and then times, on that
batch and from the same theta, alternating the two methods, ``--repeats`` times each:

* ``products``: what conjugate gradient needs -- the fused old-policy evaluation, building the
  product and ``cg_iters`` products;
* ``meta_update``: the whole TRPO step (gradient, conjugate gradient, line search).

It reports medians and the ratio double backward / chained, and checks that the two products
agree (the largest relative difference over the vectors tried). Progress goes to stderr; the
last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from flows.config import load_run_config
from maml_core.allocator import tune_allocator
from maml_core.optimizers import TRPOMetaOptimizer, flat, unflat
from maml_core.trainer import MetaLearner

METHODS = {"chained": True, "double_backward": False}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def time_products(learner: MetaLearner, batch, structured: bool, cg_iters: int,
                  vectors: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    """Seconds for the old-policy evaluation, the product's set-up and ``cg_iters`` products,
    and the products of ``vectors`` (computed after the clock stops)."""
    objective = learner.objective(*batch)
    params = learner.meta_params
    t0 = time.perf_counter()
    value = objective.at_old_policy(params, kind="surrogate")
    hvp = objective.kl_hessian_product(params, value, structured)
    if hvp.__name__ != ("chained" if structured else "generic"):
        raise SystemExit(f"the config's inner steps have no chained product ({hvp.__name__} "
                         f"was taken): first-order steps and learned step sizes use double "
                         f"backward only, so there is nothing to compare")
    v = vectors[0]
    for _ in range(cg_iters):
        out = flat(hvp(list(unflat(v, params).values())))
        v = out / out.norm()
    seconds = time.perf_counter() - t0
    return seconds, [flat(hvp(list(unflat(x, params).values()))).detach() for x in vectors]


def time_meta_update(learner: MetaLearner, batch, structured: bool) -> tuple[float, float]:
    """Seconds for one whole TRPO step from the learner's current theta (restored after),
    building the objective included, and the line-search steps it took."""
    before = {k: v.detach().clone() for k, v in learner.meta_params.items()}
    learner.optimizer.structured_hvp = structured
    try:
        t0 = time.perf_counter()
        stats = learner.optimizer.step(learner.objective(*batch))
        return time.perf_counter() - t0, stats["line_search_steps"]
    finally:
        learner.optimizer.structured_hvp = True
        with torch.no_grad():
            for k, v in learner.meta_params.items():
                v.copy_(before[k])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/navigation2d-two-step.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (repeatable)")
    p.add_argument("--warmup", type=int, default=3, help="meta-iterations before the batch")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each method")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's default)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    config = load_run_config(args.config, args.set)
    meta = config.meta_optimizer
    if meta.name != "trpo" or meta.hvp_subsample < 1.0:
        p.error(f"--config must meta-train with exact TRPO (meta_optimizer.name trpo, "
                f"hvp_subsample 1), got {meta.name!r} with hvp_subsample {meta.hvp_subsample}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tune_allocator()
    inner = config.inner
    log(f"[bench] {args.config}: {inner.num_steps} inner step(s)"
        f"{', fresh episodes' if inner.fresh_episodes else ''}"
        f"{', every step scored' if inner.every_step_objective else ''}; "
        f"{config.meta_batch_size} tasks x {config.episodes_per_task} episodes; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    learner = MetaLearner(config)
    try:
        if not learner.rl or not isinstance(learner.optimizer, TRPOMetaOptimizer):
            p.error(f"--config must be a reinforcement-learning family, got "
                    f"{config.task.family!r}")
        for i in range(args.warmup):
            stats = learner.step().stats
            log(f"[bench] warm-up {i + 1}/{args.warmup}: meta-update "
                f"{stats['seconds_meta_update']:.3f} s, post_return {stats['post_return']:.2f}")
        it = learner.iteration
        tasks = learner.sample_tasks(it)
        pre = learner.collect(learner.meta_params, tasks, it, "pre")
        later, phi, _ = learner.adapt_all(pre, tasks, it)
        post = learner.collect(phi, tasks, it, "post")
        batch = (pre, post, tuple(later))

        n = sum(v.numel() for v in learner.meta_params.values())
        g = torch.Generator().manual_seed(0)
        dtype = next(iter(learner.meta_params.values())).dtype
        vectors = [torch.randn(n, generator=g, dtype=dtype) for _ in range(3)]
        cg_iters = config.meta_optimizer.cg_iters
        seconds = {f"{m}_{what}": [] for m in METHODS for what in ("products", "meta_update")}
        line_search = {m: [] for m in METHODS}
        products = {}
        for r in range(args.repeats):
            # Alternate which method goes first, so that neither always runs on a cold cache.
            for name in (list(METHODS) if r % 2 == 0 else list(reversed(METHODS))):
                structured = METHODS[name]
                s, products[name] = time_products(learner, batch, structured, cg_iters, vectors)
                seconds[f"{name}_products"].append(s)
                s, steps = time_meta_update(learner, batch, structured)
                seconds[f"{name}_meta_update"].append(s)
                line_search[name].append(steps)
            log(f"[bench] run {r + 1}/{args.repeats}: " + ", ".join(
                f"{k} {v[-1]:.3f} s" for k, v in seconds.items()))
    finally:
        learner.close()

    difference = max(float((a - b).norm() / b.norm())
                     for a, b in zip(products["chained"], products["double_backward"]))
    med = {k: statistics.median(v) for k, v in seconds.items()}
    result = {
        "config": args.config,
        "overrides": args.set,
        "num_steps": inner.num_steps,
        "fresh_episodes": inner.fresh_episodes,
        "every_step_objective": inner.every_step_objective,
        "cg_iters": cg_iters,
        "repeats": args.repeats,
        **{f"seconds_{k}": v for k, v in med.items()},
        "products_ratio": med["double_backward_products"] / med["chained_products"],
        "meta_update_ratio": med["double_backward_meta_update"] / med["chained_meta_update"],
        "max_relative_difference": difference,
        "line_search_steps": line_search,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print(f"{args.config}: KL Hessian-vector products through {inner.num_steps} inner step(s), "
          f"median of {args.repeats}")
    print(f"  old-policy evaluation + {cg_iters} products: chained "
          f"{med['chained_products']:.3f} s, double backward "
          f"{med['double_backward_products']:.3f} s ({result['products_ratio']:.2f}x)")
    print(f"  whole TRPO step: chained {med['chained_meta_update']:.3f} s, double backward "
          f"{med['double_backward_meta_update']:.3f} s ({result['meta_update_ratio']:.2f}x)")
    print(f"  products agree to {difference:.1e} (largest relative difference); line-search "
          f"steps per TRPO step: " + ", ".join(f"{k} {v}" for k, v in line_search.items()))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
