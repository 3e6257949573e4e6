"""Seeds derived from (run seed, iteration, stage, task id).

Every random draw in a run comes from a seed computed here, so that re-running or retrying any
stage with the same inputs gives the same outputs, and so that a shard of tasks processed on
another machine draws exactly what it would have drawn locally.
"""

from __future__ import annotations

import hashlib

import torch

_MASK = (1 << 63) - 1


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part (ints or strings), stable across processes."""
    text = "/".join(str(p) for p in parts)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK


def task_seeds(run_seed: int, iteration: int, stage: str, task_ids) -> list[int]:
    """One seed per task for a stage of an iteration."""
    return [derive_seed(run_seed, iteration, stage, int(t)) for t in task_ids]


def generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g
