"""Seed candidates: scale vectors built without data that the search puts into its first population.

The user's own calibration stays the starting point: a seed is only one more member of a group's first
population, judged by the same global fitness, and adopted only if it beats every other member. Seeds are
meant for calibrations known to be poor, e.g. MinMax ranges of 2- and 3-bit weights, whose MSE-optimal
clipping lies far inside the weight's range: a random walk over thousands of per-channel scales finds it
slowly, a per-channel grid search over the weight itself at once. The default preset offers ``"weight_mse"``
(+9 to +27 points at linear W2A8 on the reference models, noise at 4 and 8 bits; benchmarks/FINDINGS.md,
section 10); ``paper`` and ``fast`` offer none.
"""

from __future__ import annotations

from typing import Callable

import torch

from .handles import Group, ScaleHandle

__all__ = ["SEEDS", "register_seed", "weight_mse_scale", "seed_vectors"]

# name -> fn(handle) returning the seeded scale of one handle (same shape as ``handle.read()``), or None
SEEDS: dict[str, Callable[[ScaleHandle], torch.Tensor | None]] = {}


def register_seed(name: str):
    """Register ``fn(handle) -> scale | None`` as a seed usable in ``SearchConfig(seed_candidates=(name,))``."""

    def decorator(fn):
        SEEDS[name] = fn
        return fn

    return decorator


@torch.no_grad()
def weight_mse_scale(handle: ScaleHandle, ratios: torch.Tensor | None = None) -> torch.Tensor | None:
    """The scale (per channel where the quantizer is) minimizing ``‖fake_quant(w) − w‖²``, among
    ``ratio × current scale`` for ``ratios`` (default 0.20, 0.22, …, 1.20). ``None`` for handles that are not
    weights or whose weight tensor the framework does not show."""
    if handle.role != "weight" or handle.weight is None:
        return None
    current = handle.read()
    weight = handle.weight.detach().float()
    if ratios is None:
        ratios = torch.linspace(0.2, 1.2, 51)
    shape = [1] * weight.dim()
    if handle.axis is not None:
        shape[handle.axis] = -1
        reduce_dims = [d for d in range(weight.dim()) if d != handle.axis]
    else:
        reduce_dims = list(range(weight.dim()))
    base = current.to(weight.device).float().reshape(shape)
    zero_point = handle.zero_points().to(weight.device).float().reshape(shape if handle.axis is not None else [])
    best_error = best_scale = None
    for ratio in ratios.tolist():
        scale = (base * ratio).clamp_min(1e-12)
        quantized = (torch.clamp(torch.round(weight / scale) + zero_point, handle.quant_min, handle.quant_max)
                     - zero_point) * scale
        error = (quantized - weight).pow(2).sum(dim=reduce_dims) if reduce_dims else (quantized - weight).pow(2)
        error = error.reshape(-1)
        candidate = scale.reshape(-1).expand_as(error) if handle.axis is not None else scale.reshape(-1)
        if best_error is None:
            best_error, best_scale = error.clone(), candidate.clone()
        else:
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_scale = torch.where(better, candidate, best_scale)
    return best_scale.reshape(current.shape).to(current.dtype).to(current.device)


register_seed("weight_mse")(weight_mse_scale)


def seed_vectors(group: Group, names: tuple[str, ...]) -> list[torch.Tensor]:
    """One vector per seed in ``names`` that changes at least one of the group's scales (in ``group.read()``
    order: the seeded scale where the seed gives one, the current scale elsewhere)."""
    vectors = []
    for name in names:
        if name not in SEEDS:
            raise ValueError(f"unknown seed candidate {name!r}; registered: {sorted(SEEDS)}")
        parts, changed = [], False
        for handle in group.handles:
            current = handle.read()
            seeded = SEEDS[name](handle)
            if seeded is not None and not torch.equal(seeded, current):
                changed = True
                parts.append(seeded.reshape(-1).float())
            else:
                parts.append(current.reshape(-1).float())
        if changed:
            vectors.append(torch.cat(parts))
    return vectors
