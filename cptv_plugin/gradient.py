"""The gradient stage: after the search, every scale moves together by gradient descent on a fitness.

The evolutionary search moves one block's scales at a time by random relative steps; with thousands of per-channel
weight scales (2-bit weights) its population of 15 explores little of that space. A fitness such as KL between
the quantized and full-precision outputs is differentiable in every scale once the rounding passes gradients
straight through (LSQ's estimator), so Adam on ``log(scale)`` moves all of them at once, each by its own
gradient. On the reference models this took DeiT-like linear W2A8 from 80.9 % (the search alone) to 88.0 %
(3 seeds; benchmarks/FINDINGS.md, section 14).

The stage needs no framework support: each quantizer's module (:attr:`ScaleHandle.quantizer_module`) gets a
forward hook that replaces its output by :meth:`ScaleHandle.fake_quantize` at the learned scale, in the
framework's own arithmetic. Scales whose framework calls no such module stay where the search left them.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from .engine import batch_fitness, mean_fitness
from .fitness import get_fitness
from .handles import ScaleHandle

__all__ = ["gradient_refine"]

logger = logging.getLogger(__name__)


def gradient_refine(handles: list[ScaleHandle], forward: Callable[[torch.Tensor], Any], batches: list[torch.Tensor],
                    reference: list[torch.Tensor], *, steps: int, lr: float, fitness: str = "kl",
                    temperature: float = 0.1, normalize: bool = True, seed: int = 0,
                    progress: bool = False) -> dict:
    """Move the scales of ``handles`` by ``steps`` Adam steps (cosine-decayed ``lr`` on ``log(scale)``) on
    ``fitness`` between ``forward(batch)`` and ``reference`` (one calibration batch per step, in a seeded order).

    The scales are set only if the mean fitness over all batches ends lower than it started (else they stay as
    given and a warning says so). Ctrl-C leaves them as given and re-raises. Returns ``{"steps", "lr", "fitness",
    "loss_before", "loss_after", "kept", "scales", "fixed", "seconds"}`` (``scales``: how many quantizers moved;
    ``fixed``: how many could not, having no quantizer module)."""
    start_time = time.time()
    movable = [h for h in handles if h.quantizer_module is not None]
    fixed = len(handles) - len(movable)
    if fixed:
        logger.info("gradient stage: %d of %d quantizers have no module to hook and keep the search's scales",
                    fixed, len(handles))
    loss_fn = get_fitness(fitness)
    # scale = given × exp(δ), δ from 0: exactly the given scale at the start (exp(log(s)) is not always s, and one
    # ulp moves a value across a rounding boundary)
    given = [h.read().detach().float().clone() for h in movable]
    log_factors = [torch.zeros_like(g).requires_grad_() for g in given]
    record = {"steps": steps, "lr": lr, "fitness": fitness, "scales": len(movable), "fixed": fixed}
    if not movable or steps == 0:
        return {**record, "loss_before": None, "loss_after": None, "kept": False, "seconds": 0.0}

    def hook_for(handle: ScaleHandle, base: torch.Tensor, log_factor: torch.Tensor):
        def hook(module, args, output):
            return handle.fake_quantize(args[0], base * log_factor.exp(), straight_through=True).to(output.dtype)
        return hook

    def mean_loss() -> float:
        return mean_fitness(forward, batches, reference, loss_fn, temperature, normalize)

    hooks = [handle.quantizer_module.register_forward_hook(hook_for(handle, base, log_factor))
             for handle, base, log_factor in zip(movable, given, log_factors)]
    try:
        record["loss_before"] = mean_loss()
        optimizer = torch.optim.Adam(log_factors, lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        generator = torch.Generator().manual_seed(seed)
        order: list[int] = []
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, desc="cpt-v gradient", disable=not progress, unit="step")
        except ImportError:  # pragma: no cover - tqdm is a dependency
            bar = None
        try:
            for step in range(steps):
                if not order:  # every batch once per epoch, in a seeded order
                    order = torch.randperm(len(batches), generator=generator).tolist()
                index = order.pop()
                loss = batch_fitness(forward, batches[index], reference[index], loss_fn, temperature, normalize)
                gradients = torch.autograd.grad(loss, log_factors, allow_unused=True)
                for log_factor, gradient in zip(log_factors, gradients):
                    log_factor.grad = gradient
                optimizer.step()
                schedule.step()
                if bar is not None and progress:
                    bar.update(1)
                    if step % 20 == 0:  # reading the loss waits for the device
                        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        finally:
            if bar is not None:
                bar.close()
        record["loss_after"] = mean_loss()
    finally:
        for hook in hooks:
            hook.remove()
    record["kept"] = record["loss_after"] < record["loss_before"]
    if record["kept"]:
        for handle, base, log_factor in zip(movable, given, log_factors):
            handle.set((base * log_factor.detach().exp()).reshape(base.shape))
    else:
        logger.warning("gradient stage: %s rose from %.5f to %.5f; keeping the search's scales (a smaller "
                       "SearchConfig.gradient_lr may help; gradient_steps=0 skips the stage)", fitness,
                       record["loss_before"], record["loss_after"])
    record["seconds"] = round(time.time() - start_time, 3)
    logger.info("gradient stage: %s %.5f -> %.5f over %d steps (%d quantizers) in %.1f s", fitness,
                record["loss_before"], record["loss_after"], steps, len(movable), record["seconds"])
    return record
