"""Seed and start candidates: other scales the search offers its global fitness besides the user's own.

*Start candidates* (``SearchConfig.start_candidates``) are whole-model alternatives judged once, before the first
visit: the search starts from whichever of the user's scales and the candidates has the best fitness (or, when
the user's scales are far off, agrees most often with the full-precision model's top-1).
``"activation_mse"`` clips every per-tensor activation range to the scale that minimizes the quantization error
of the full-precision activations it sees on calibration images (MinMax ranges of 4-bit activations are 2-7×
too wide on the reference models, further than the search's relative steps walk; benchmarks/FINDINGS.md,
section 13).

*Seed candidates* (``SearchConfig.seed_candidates``) are scale vectors built without data that the search puts
into a group's first population.

The user's own calibration stays the starting point: a seed is only one more member of a group's first
population, judged by the same global fitness, and adopted only if it beats every other member. Seeds are
meant for calibrations known to be poor, e.g. MinMax ranges of 2- and 3-bit weights, whose MSE-optimal
clipping lies far inside the weight's range: a random walk over thousands of per-channel scales finds it
slowly, a per-channel grid search over the weight itself at once. The default preset offers ``"weight_mse"``
(+9 to +27 points at linear W2A8 on the reference models, noise at 4 and 8 bits; benchmarks/FINDINGS.md,
section 10); ``paper`` and ``fast`` offer none.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from .handles import Group, ScaleHandle

__all__ = ["SEEDS", "STARTS", "register_seed", "register_start", "weight_mse_scale", "seed_vectors",
           "activation_mse_scales", "start_vectors"]

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


# name -> fn(handles, run_full_precision) returning {handle: scale} for the handles it changes; ``run_full_precision``
# runs calibration images through the model with quantization off (hooks the function registered see the tensors)
STARTS: dict[str, Callable[[list[ScaleHandle], Callable[[], None]], dict[ScaleHandle, torch.Tensor]]] = {}


def register_start(name: str):
    """Register ``fn(handles, run_full_precision) -> {handle: scale}`` as a start usable in
    ``SearchConfig(start_candidates=(name,))``."""

    def decorator(fn):
        STARTS[name] = fn
        return fn

    return decorator


# ratios of the current activation scale tried by ``activation_mse_scales``: 0.02 … 1.20 in steps of 0.02
ACTIVATION_RATIOS = tuple(round(0.02 * k, 2) for k in range(1, 61))
# elements of each tensor a quantizer sees that judge its ratios (drawn uniformly, the same draw for every ratio)
ACTIVATION_SAMPLE = 2 ** 16
# (ratios × elements) computed at once: on a GPU large kernels; on the CPU slices that stay in the cache (2 ** 18
# floats, 1 MiB: the CI ViT's activation start, on the 256 images it sees, took 2.8 s instead of 4.1 s, medians of
# 4 runs on 2 cores; with 2 ** 14 or 2 ** 16 the calls' overhead made it slower)
_ERROR_ELEMENTS = {"cpu": 2 ** 18}
_ERROR_ELEMENTS_DEFAULT = 2 ** 22


@torch.no_grad()
def activation_mse_scales(handles: list[ScaleHandle], run_full_precision: Callable[[], None],
                          ratios: Iterable[float] = ACTIVATION_RATIOS,
                          sample: int | None = ACTIVATION_SAMPLE) -> dict[ScaleHandle, torch.Tensor]:
    """For every per-tensor activation handle with an :attr:`~ScaleHandle.input_module`: the scale, among
    ``ratio × current scale``, that minimizes ``‖fake_quant(x) − x‖²`` summed over the full-precision tensors
    ``x`` the quantizer sees while ``run_full_precision`` runs (over ``sample`` elements of each, drawn with a fixed
    seed; ``None``: all). Each quantizer is judged on its own inputs, as TensorRT's and ModelOpt's MSE calibrators
    do; the errors are accumulated on the fly, nothing is stored."""
    ratios = torch.tensor(list(ratios), dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    chosen = [h for h in handles if h.role == "activation" and h.axis is None and h.input_module is not None]
    errors: dict[ScaleHandle, torch.Tensor] = {}
    hooks = []

    def observe(handle: ScaleHandle):
        candidates = float(handle.read().reshape(-1)[0]) * ratios  # on the CPU; moved to the inputs' device

        def hook(module, args):
            inputs = args[0].detach().float().reshape(-1)
            if sample is not None and inputs.numel() > sample:
                inputs = inputs[torch.randint(inputs.numel(), (sample,), generator=generator).to(inputs.device)]
            scales = candidates.to(inputs.device).reshape(-1, 1)
            # every ratio at once, a bounded slice of inputs at a time; summed in float64, so that how the inputs
            # are sliced does not decide between two ratios
            chunk = max(1, _ERROR_ELEMENTS.get(inputs.device.type, _ERROR_ELEMENTS_DEFAULT) // len(scales))
            total = sum((handle.fake_quantize(part, scales) - part).pow(2).sum(dim=1, dtype=torch.float64)
                        for part in inputs.reshape(1, -1).split(chunk, dim=1))
            errors[handle] = errors[handle] + total if handle in errors else total

        return hook

    try:
        for handle in chosen:
            hooks.append(handle.input_module.register_forward_pre_hook(observe(handle)))
        run_full_precision()
    finally:
        for hook in hooks:
            hook.remove()
    scales = {}
    for handle, error in errors.items():
        current = handle.read()
        best = float(ratios[int(torch.argmin(error.cpu()))])
        if best != 1.0:
            scales[handle] = (current.float() * best).to(current.dtype)
    return scales


register_start("activation_mse")(activation_mse_scales)


def start_vectors(groups: list[Group], names: tuple[str, ...],
                  run_full_precision: Callable[[], None]) -> dict[str, list[torch.Tensor]]:
    """For each start in ``names`` that changes at least one scale: one vector per group (the started scale where
    the start gives one, the current scale elsewhere), in ``group.read()`` order."""
    handles = [h for g in groups for h in g.handles]
    starts = {}
    for name in names:
        if name not in STARTS:
            raise ValueError(f"unknown start candidate {name!r}; registered: {sorted(STARTS)}")
        scales = STARTS[name](handles, run_full_precision)
        if scales:
            starts[name] = [torch.cat([scales.get(h, h.read()).reshape(-1).float() for h in g.handles])
                            if g.handles else torch.empty(0) for g in groups]
    return starts
