"""The gradient stage: after the search, every scale moves together by gradient descent on a fitness.

The evolutionary search moves one block's scales at a time by random relative steps; with thousands of per-channel
weight scales (2-bit weights) its population of 15 explores little of that space. A fitness such as KL between
the quantized and full-precision outputs is differentiable in every scale once the rounding passes gradients
straight through (LSQ's estimator), so Adam on ``log(scale)`` moves all of them at once, each by its own
gradient. On the reference models this took DeiT-like linear W2A8 from 80.9 % (the search alone) to 88.0 % and,
with every op quantized by torch.ao FX, W4A4 from 64.1 % to 85.9 % (3 seeds; benchmarks/FINDINGS.md, sections
14-15).

The stage needs no framework support: each quantizer's module (:attr:`ScaleHandle.quantizer_module`) gets a
forward hook that replaces its output by :meth:`ScaleHandle.fake_quantize` at the learned scale, in the
framework's own arithmetic. Scales whose framework calls no such module stay where the search left them.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import torch

from .engine import COMPILE_OPTIONS, _CompiledOrEager, batch_fitness, mean_fitness
from .fitness import get_fitness
from .handles import ScaleHandle

__all__ = ["gradient_refine"]

logger = logging.getLogger(__name__)


def gradient_refine(handles: list[ScaleHandle], forward: Callable[[torch.Tensor], Any], batches: list[torch.Tensor],
                    reference: list[torch.Tensor], *, steps: int, lr: float, fitness: str = "kl",
                    temperature: float = 0.1, normalize: bool = True, seed: int = 0,
                    checks: int = 10, progress: bool = False, compile: bool = False) -> dict:
    """Move the scales of ``handles`` by ``steps`` Adam steps (cosine-decayed ``lr`` on ``log(scale)``) on
    ``fitness`` between ``forward(batch)`` and ``reference`` (one calibration batch per step, in a seeded order).
    ``compile``: run the forward and its backward as ``torch.compile`` graphs, the hooks included (small models
    spend most of an eager step launching kernels); it falls back to eager if dynamo fails on the model.

    ``checks`` times during the run (and at its end) the mean fitness over all batches is measured; the scales
    with the lowest so far are the result, set only if lower than at the start (else they stay as given and a
    warning says so). A check above the start's fitness puts the best scales so far back and divides the rate by
    10 for the rest of the run (the rate overshoots). Ctrl-C leaves the scales as given and
    re-raises. Returns ``{"steps", "lr", "fitness", "loss_before", "loss_after", "history", "kept", "compiled",
    "scales", "fixed", "seconds"}`` (``loss_after``: the best check's; ``history``: ``{"step", "loss", "lr"}`` per
    check, lr the undecayed rate then; ``scales``: how many quantizers moved; ``fixed``: how many could not, having
    no quantizer module)."""
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
        return {**record, "loss_before": None, "loss_after": None, "history": [], "kept": False, "compiled": False,
                "seconds": 0.0}

    def hook_for(handle: ScaleHandle, base: torch.Tensor, log_factor: torch.Tensor):
        def hook(module, args, output):
            return handle.fake_quantize(args[0], base * log_factor.exp(), straight_through=True).to(output.dtype)
        return hook

    if compile:
        forward = _CompiledOrEager(torch.compile(forward, dynamic=False, **COMPILE_OPTIONS), forward)
        # its first measurement waits for the compilation: say why the stage seems to stall
        logger.info("gradient stage: compiling the model's forward and backward (on a machine without inductor's "
                    "cache for this model: minutes, e.g. ~280 s for a small Swin with every op quantized on an "
                    "H100; later runs reuse the cache)")

    def mean_loss() -> float:  # compiled: through the training graph (an inference graph would compile again)
        return mean_fitness(forward, batches, reference, loss_fn, temperature, normalize, record_gradients=compile)

    hooks = [handle.quantizer_module.register_forward_hook(hook_for(handle, base, log_factor))
             for handle, base, log_factor in zip(movable, given, log_factors)]
    check_every = max(1, steps // checks)
    try:
        best_loss = record["loss_before"] = mean_loss()
        best = [torch.zeros_like(g) for g in given]
        history = [{"step": 0, "loss": round(best_loss, 6), "lr": lr}]
        rate = lr  # cosine-decayed from here; divided by 10 at each backtrack
        optimizer = torch.optim.Adam(log_factors, lr=lr)
        generator = torch.Generator().manual_seed(seed)
        order: list[int] = []
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, desc="cpt-v gradient", disable=not progress, unit="step")
        except ImportError:  # pragma: no cover - tqdm is a dependency
            bar = None
        try:
            for step in range(steps):
                for group in optimizer.param_groups:
                    group["lr"] = rate * 0.5 * (1 + math.cos(math.pi * step / steps))
                if not order:  # every batch once per epoch, in a seeded order
                    order = torch.randperm(len(batches), generator=generator).tolist()
                index = order.pop()
                loss = batch_fitness(forward, batches[index], reference[index], loss_fn, temperature, normalize)
                gradients = torch.autograd.grad(loss, log_factors, allow_unused=True)
                for log_factor, gradient in zip(log_factors, gradients):
                    log_factor.grad = gradient
                optimizer.step()
                if bar is not None and progress:
                    bar.update(1)
                    if step % 20 == 0:  # reading the loss waits for the device
                        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
                if (step + 1) % check_every and step + 1 < steps:
                    continue
                checked = mean_loss()
                history.append({"step": step + 1, "loss": round(checked, 6), "lr": rate})
                if checked < best_loss:
                    best_loss, best = checked, [f.detach().clone() for f in log_factors]
                elif checked > record["loss_before"] and step + 1 < steps:
                    # worse than at the start, the rate overshoots: back to the best scales so far, a tenth of the
                    # rate, fresh moments (a check merely above the best is the steps' noise: the run goes on)
                    with torch.no_grad():
                        for log_factor, kept in zip(log_factors, best):
                            log_factor.copy_(kept)
                    rate /= 10
                    optimizer = torch.optim.Adam(log_factors, lr=rate)
        finally:
            if bar is not None:
                bar.close()
    finally:
        for hook in hooks:
            hook.remove()
    record.update(loss_after=best_loss, history=history, kept=best_loss < record["loss_before"],
                  compiled=isinstance(forward, _CompiledOrEager) and not forward.failed)
    if record["kept"]:
        for handle, base, log_factor in zip(movable, given, best):
            handle.set((base * log_factor.exp()).reshape(base.shape))
    else:
        logger.warning("gradient stage: %s never fell below %.5f (%s at the checks); keeping the search's scales "
                       "(a smaller SearchConfig.gradient_lr may help; gradient_steps=0 skips the stage)", fitness,
                       record["loss_before"], ", ".join(f"{h['loss']:.5f}" for h in history[1:]))
    record["seconds"] = round(time.time() - start_time, 3)
    logger.info("gradient stage: %s %.5f -> %.5f over %d steps (%d quantizers) in %.1f s", fitness,
                record["loss_before"], record["loss_after"], steps, len(movable), record["seconds"])
    return record
