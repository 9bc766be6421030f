"""The gradient stage: after the search, every scale moves together by gradient descent on a fitness.

The evolutionary search moves one block's scales at a time by random relative steps; with thousands of per-channel
weight scales (2-bit weights) its population of 15 explores little of that space. A fitness such as KL between
the quantized and full-precision outputs is differentiable in every scale once the rounding passes gradients
straight through (LSQ's estimator), so Adam on ``log(scale)`` moves all of them at once, each by its own
gradient. On the reference models this took DeiT-like linear W2A8 from 80.9 % (the search alone) to 88.0 % and,
with every op quantized by torch.ao FX, W4A4 from 64.1 % to 85.9 % (3 seeds; benchmarks/FINDINGS.md, sections
14-15).

The stage needs no framework support: each quantizer's module (:attr:`ScaleHandle.quantizer_module`) runs
:meth:`ScaleHandle.fake_quantize` at the learned scale instead of its own forward, in the framework's own
arithmetic. Scales whose framework calls no such module stay where the search left them.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import torch

from .engine import COMPILE_OPTIONS, _CompiledOrEager, _as_output_tensor, _group_batches
from .fitness import get_fitness
from .handles import ScaleHandle, affine_fake_quantize_with_mask

__all__ = ["gradient_refine"]

logger = logging.getLogger(__name__)


def gradient_refine(handles: list[ScaleHandle], forward: Callable[[torch.Tensor], Any], batches: list[torch.Tensor],
                    reference: list[torch.Tensor], *, steps: int, lr: float, fitness: str = "kl",
                    temperature: float = 0.1, normalize: bool = True, seed: int = 0,
                    checks: int = 10, progress: bool = False, compile: bool = False,
                    cuda_graph: bool = False, warmup: float = 0.0, backtrack: float = 10.0, grace: int = 0,
                    step_images: int | None = None, clip_weights: Callable[[], int] | None = None) -> dict:
    """Move the scales of ``handles`` by ``steps`` Adam steps (cosine-decayed ``lr`` on ``log(scale)``) on
    ``fitness`` between ``forward(batch)`` and ``reference`` (one calibration batch per step, in a seeded order).
    ``step_images``: consecutive calibration batches packed into steps of up to this many images (one forward
    pass each; the step's loss is the mean of its batches' fitness, each batch still its own fitness batch);
    ``None``: one batch per step.
    ``warmup``: the fraction of the steps over which the rate rises linearly to ``lr`` first (Adam's first steps
    move every scale by about the full rate, whatever its gradient's size).
    ``compile``: run the forward and its backward as ``torch.compile`` graphs, the quantizers' replaced forwards
    included (small models spend most of an eager step launching kernels); it falls back to eager if dynamo fails
    on the model, or if the compiled model ignores the learned scales or passes them no gradient
    (``compile_fallback`` in the record says which).
    ``cuda_graph`` (CUDA only): capture one eager step (forward, backward, Adam update) as a CUDA graph per batch
    shape and replay it: no kernel launches from the host and no compilation (a capture costs about two eager
    steps); the same arithmetic as the eager step. If the model cannot be captured (a host sync in its forward),
    a warning says why and the stage runs as without it.

    ``checks`` times during the run (and at its end) the mean fitness over all batches is measured; the scales
    with the lowest so far are the result, set only if lower than at the start (else they stay as given and a
    warning says so). A check above the start's fitness puts the best scales so far back and divides the rate by
    ``backtrack`` for the rest of the run (the rate overshoots); checks before step ``grace`` do not (a first cut by
    step 100 with no grace is most often Adam's first rise: the log names the grace that lets it pass). With
    ``clip_weights`` (clips the weights the commit will clip, at the handles' current scales; returns how many
    moved), the first such check that clips some weight does so at the best scales so far instead of cutting the
    rate: a weight beyond its grid pulls its scale outwards (``clipped_weights`` and ``clipped_at`` in the record);
    where none moves (8-bit weights, or none beyond the grid yet) the rate is cut as without it. Ctrl-C leaves
    the scales as given and re-raises. Returns ``{"steps", "lr", "fitness", "loss_before", "loss_after",
    "history", "kept", "backtracks", "compiled", "cuda_graph", "scales", "fixed", "seconds", "timing"}``
    (``loss_after``: the best check's; ``backtracks``: how many times the rate was cut; ``history``:
    ``{"step", "loss", "lr"}`` per check, lr the undecayed rate then; ``cuda_graph``: whether the steps were
    replayed as CUDA graphs; ``scales``: how many quantizers moved; ``fixed``: how many could not, having no
    quantizer module; ``timing``: seconds until the first check ended (capturing or compiling included), in the
    steps, in the later checks)."""
    start_time = time.time()
    movable = [h for h in handles if h.quantizer_module is not None]
    fixed = len(handles) - len(movable)
    if fixed:
        logger.info("gradient stage: %d of %d quantizers have no module to run through and keep the search's "
                    "scales", fixed, len(handles))
    loss_fn = get_fitness(fitness)
    # scale = given × exp(δ), δ from 0: exactly the given scale at the start (exp(log(s)) is not always s, and one
    # ulp moves a value across a rounding boundary)
    given = [h.read().detach().float().clone() for h in movable]
    log_factors = [torch.zeros_like(g).requires_grad_() for g in given]
    record = {"steps": steps, "lr": lr, "fitness": fitness, "scales": len(movable), "fixed": fixed}
    if warmup:
        record["warmup"] = warmup
    if backtrack != 10.0:
        record["backtrack"] = backtrack
    if grace:
        record["grace"] = grace
    warmup_steps = max(1, round(warmup * steps))
    if not movable or steps == 0:
        return {**record, "loss_before": None, "loss_after": None, "history": [], "kept": False, "backtracks": 0,
                "compiled": False, "cuda_graph": False, "seconds": 0.0,
                "timing": {"setup": 0.0, "steps": 0.0, "checks": 0.0}}

    graphed = cuda_graph and given[0].is_cuda
    # fitness batches packed into steps; only the last batch may be smaller, so splitting a step's images by the
    # first batch's size gives its batches back
    per_batch = len(batches[0])
    packed = _group_batches([len(b) for b in batches], step_images)
    if len(packed) < len(batches):
        record["step_images"] = max(sum(len(batches[i]) for i in members) for members in packed)
        batches = [torch.cat([batches[i] for i in members]) for members in packed]
        reference = [torch.cat([reference[i] for i in members]) for members in packed]
    batches_per_step = [len(members) for members in packed]

    learned = _LearnedScales(given, log_factors)

    def step_fitness(images: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """The mean fitness of the fitness batches packed in ``images`` (float32 scalar)."""
        learned.update()
        output = _as_output_tensor(forward(images)).float()
        ref = ref.float()
        if len(images) <= per_batch:
            return loss_fn(output, ref, temperature=temperature, normalize=normalize)
        values = [loss_fn(out, target, temperature=temperature, normalize=normalize)
                  for out, target in zip(output.split(per_batch), ref.split(per_batch))]
        return torch.stack(values).mean()

    def batch_loss(images: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return step_fitness(images, ref)

    check_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # the checks' captured forward

    def mean_loss() -> float:
        """The mean fitness over every calibration batch (compiled: through the training graph, as an inference
        graph would compile again)."""
        if check_fn is None:
            with torch.set_grad_enabled(compile):
                values = [float(step_fitness(images, ref).detach()) * count
                          for images, ref, count in zip(batches, reference, batches_per_step)]
            return sum(values) / sum(batches_per_step)
        total = torch.zeros((), device=given[0].device)
        for images, ref, count in zip(batches, reference, batches_per_step):
            total = total + check_fn(images, ref) * count  # queued before the next replay overwrites the output
        return float(total) / sum(batches_per_step)

    # a rate held in a device tensor and Adam's step counter on the device: a captured update reads both
    optimizer = torch.optim.Adam(log_factors, lr=torch.tensor(lr, device=given[0].device) if graphed else lr,
                                 capturable=graphed)

    def set_rate(value: float) -> None:
        for group in optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(value)
            else:
                group["lr"] = value

    def reset_moments() -> None:  # a fresh Adam, in place (a captured update keeps reading the same tensors)
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    value.zero_()

    def train_step(images: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        loss = step_fitness(images, ref)
        gradients = torch.autograd.grad(loss, log_factors, allow_unused=True)
        for log_factor, gradient in zip(log_factors, gradients):
            log_factor.grad = gradient
        optimizer.step()
        return loss

    undo = [_run_instead(handle.quantizer_module, _LearnedFakeQuant(handle, learned, index))
            for index, handle in enumerate(movable)]
    check_every = max(1, steps // checks)
    try:
        step_fn = train_step
        if graphed:
            try:
                step_fn = _Graphed(train_step, batches, reference, log_factors, reset_moments)
                # the checks replayed too: an eager forward of a model with every op quantized launches a few
                # thousand kernels (Swin-like e2e: ~0.7 s a check, a fifth of the stage's time, on an H200)
                check_fn = _Graphed(batch_loss, batches, reference, log_factors, lambda: None)
            except RuntimeError as error:
                graphed, step_fn, check_fn = False, train_step, None
                reason = " ".join(str(error).split())[:300]
                logger.warning("gradient stage: the model's step could not be captured as a CUDA graph (%s); it "
                               "runs without one", reason)
        if compile and not graphed:
            forward = _CompiledOrEager(torch.compile(forward, dynamic=False, **COMPILE_OPTIONS), forward)
            # its first measurement waits for the compilation: say why the stage seems to stall
            logger.info("gradient stage: compiling the model's forward and backward (on a machine without "
                        "inductor's cache for this model: minutes, e.g. ~280 s for a small Swin with every op "
                        "quantized on an H100; later runs reuse the cache)")
            fault = _compiled_stage_fault(forward, batches[0], learned, log_factors)
            if fault is not None:
                logger.warning("gradient stage: the compiled model %s (torch %s); the stage runs eagerly", fault,
                               torch.__version__)
                forward, compile = forward.eager, False
                record["compile_fallback"] = fault
        best_loss = record["loss_before"] = mean_loss()
        setup_seconds = time.time() - start_time  # capturing, or the first compiled call
        step_seconds = check_seconds = 0.0
        last = time.time()
        best = [torch.zeros_like(g) for g in given]
        history = [{"step": 0, "loss": round(best_loss, 6), "lr": lr}]
        rate = lr  # cosine-decayed from here; divided by ``backtrack`` at each backtrack
        backtracks = first_cut = 0
        generator = torch.Generator().manual_seed(seed)
        order: list[int] = []
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, desc="cpt-v gradient", disable=not progress, unit="step")
        except ImportError:  # pragma: no cover - tqdm is a dependency
            bar = None
        try:
            for step in range(steps):
                set_rate(rate * 0.5 * (1 + math.cos(math.pi * step / steps)) * min(1.0, (step + 1) / warmup_steps))
                if not order:  # every batch once per epoch, in a seeded order
                    order = torch.randperm(len(batches), generator=generator).tolist()
                index = order.pop()
                loss = step_fn(batches[index], reference[index])
                if bar is not None and progress:
                    bar.update(1)
                    if step % 20 == 0:  # reading the loss waits for the device
                        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
                if (step + 1) % check_every and step + 1 < steps:
                    continue
                if given[0].is_cuda:  # the steps are queued: wait for them, so that the timing splits right
                    torch.cuda.synchronize(given[0].device)
                before_check = time.time()
                checked = mean_loss()
                step_seconds += before_check - last
                last = time.time()
                check_seconds += last - before_check
                history.append({"step": step + 1, "loss": round(checked, 6), "lr": rate})
                if checked < best_loss:
                    best_loss, best = checked, [f.detach().clone() for f in log_factors]
                elif checked > record["loss_before"] and grace <= step + 1 < steps:
                    # worse than at the start, the rate overshoots: back to the best scales so far, a smaller
                    # rate, fresh moments (a check merely above the best is the steps' noise: the run goes on)
                    with torch.no_grad():
                        for log_factor, kept in zip(log_factors, best):
                            log_factor.copy_(kept)
                    # gradient_clip_weights="on_overshoot": the first overshoot that clips some weight keeps the
                    # rate (a model with no weight beyond its grid, e.g. at 8 bits, cuts it as without the clip)
                    moved = (_clip_at(movable, given, best, clip_weights)
                             if clip_weights is not None and "clipped_at" not in record else 0)
                    if moved:
                        record["clipped_weights"], record["clipped_at"] = moved, step + 1
                    else:
                        rate /= backtrack
                        backtracks += 1
                        first_cut = first_cut or step + 1
                    reset_moments()
        finally:
            if bar is not None:
                bar.close()
    finally:
        for restore in reversed(undo):
            restore()
    record.update(loss_after=best_loss, history=history, kept=best_loss < record["loss_before"], backtracks=backtracks,
                  compiled=isinstance(forward, _CompiledOrEager) and not forward.failed, cuda_graph=graphed,
                  timing={"setup": round(setup_seconds, 3), "steps": round(step_seconds, 3),
                          "checks": round(check_seconds, 3)})
    early_cut = first_cut and first_cut <= EARLY_CUT_STEPS and not grace
    # a cut within Adam's first rise: fresh moments move every scale by about the full rate, so the fitness rises
    # for a few dozen steps before it falls; a grace lets those steps pass (benchmarks/FINDINGS.md, section 42)
    advice = (f"SearchConfig.gradient_grace={_early_grace(check_every)} lets the first steps pass: the "
              f"rate was cut at step {first_cut}, where Adam's first steps raise the fitness before it falls"
              if early_cut else "a smaller SearchConfig.gradient_lr may help")
    if record["kept"]:
        _set_scales(movable, given, best)
        if early_cut:
            logger.info("gradient stage: %s", advice)
    else:
        logger.warning("gradient stage: %s never fell below %.5f (%s at the checks); keeping the search's scales "
                       "(%s; gradient_steps=0 skips the stage)", fitness, record["loss_before"],
                       ", ".join(f"{h['loss']:.5f}" for h in history[1:]), advice)
    record["seconds"] = round(time.time() - start_time, 3)
    logger.info("gradient stage: %s %.5f -> %.5f over %d steps (%d quantizers; the rate cut %d times at checks above "
                "the start) in %.1f s", fitness, record["loss_before"], record["loss_after"], steps, len(movable),
                backtracks, record["seconds"])
    return record


# a rate cut at or before this step is taken for Adam's first rise (the first 100 steps: both presets' first check)
EARLY_CUT_STEPS = 100


def _early_grace(check_every: int) -> int:
    """A round ``gradient_grace`` under which no check up to step ``EARLY_CUT_STEPS`` cuts the rate: 100 for
    ``fast``'s checks every 30 steps, 110 for the default's every 100 (101 to 200 act alike there)."""
    return math.ceil((EARLY_CUT_STEPS // check_every * check_every + 1) / 10) * 10


def _set_scales(movable: list[ScaleHandle], given: list[torch.Tensor], factors: list[torch.Tensor]) -> None:
    """Set each handle to its learned scale ``given · exp(factor)``."""
    for handle, base, factor in zip(movable, given, factors):
        handle.set((base * factor.exp()).reshape(base.shape))


def _clip_at(movable: list[ScaleHandle], given: list[torch.Tensor], factors: list[torch.Tensor],
             clip_weights: Callable[[], int]) -> int:
    """``clip_weights()`` with the handles at the scales ``given · exp(factors)``; the handles keep their own
    scales afterwards (the stage sets them at its end)."""
    saved = [h.read() for h in movable]
    _set_scales(movable, given, factors)
    try:
        return clip_weights()
    finally:
        for handle, value in zip(movable, saved):
            handle.set(value)


def _compiled_stage_fault(forward: Callable[[torch.Tensor], Any], images: torch.Tensor, learned: "_LearnedScales",
                          log_factors: list[torch.Tensor]) -> str | None:
    """Why the stage cannot train through ``forward`` (``None``: it can). Its output on ``images`` must change when
    every learned scale grows by 10 % (``log_factors`` are 0 before and after), and a loss on it must pass a
    gradient to the learned scales. On an H200 with torch 2.11 the compiled forward followed the scales but its
    steps moved nothing: the KL equal to six digits at every check (benchmarks/FINDINGS.md, sections 39-40). Run
    with gradients recorded, as the steps are: an inference graph would compile again."""
    learned.update()
    output = _as_output_tensor(forward(images)).float()
    try:
        gradients = torch.autograd.grad(output.square().mean(), log_factors, allow_unused=True)
    except RuntimeError:  # the output does not depend on anything that records a gradient
        gradients = [None] * len(log_factors)
    before = output.detach().clone()
    with torch.no_grad():
        torch._foreach_add_(log_factors, 0.1)
    learned.update()
    after = _as_output_tensor(forward(images)).detach().float()
    with torch.no_grad():
        torch._foreach_zero_(log_factors)
    learned.update()
    if torch.equal(before, after):
        return "ignores the learned scales"
    if not any(g is not None and bool(g.ne(0).any()) for g in gradients):
        return "passes no gradient to the learned scales"
    return None


class _LearnedScales:
    """Every learned scale ``given · exp(δ)``, computed once per forward pass by two foreach ops for all of them
    (computed in each quantizer call, they cost two kernels a call, and torch.ao calls a shared quantizer up to
    three times a block), outside autograd: the gradient reaches ``δ`` through :class:`_StraightThroughFakeQuant`,
    which returns it directly."""

    def __init__(self, given: list[torch.Tensor], log_factors: list[torch.Tensor]):
        self.given, self.log_factors = given, log_factors
        self.values: list[torch.Tensor] = []

    def update(self) -> None:
        with torch.no_grad():
            values = torch._foreach_exp(self.log_factors)
            torch._foreach_mul_(values, self.given)  # exp(δ) · given: the same product as given · exp(δ)
        self.values = values


class _LearnedFakeQuant:
    """A quantizer's forward during the stage: ``handle.fake_quantize(x, given · exp(δ))`` with the
    straight-through gradients of :class:`_StraightThroughFakeQuant`. Where the handle keeps the base class's
    arithmetic (torch.ao's) and its zero points are all 0 (symmetric weights), they are left out: the same values,
    two ops fewer (a kernel each, every step, in a CUDA-graphed step)."""

    def __init__(self, handle: ScaleHandle, learned: _LearnedScales, index: int):
        self.handle, self.learned, self.index = handle, learned, index
        self.base, self.log_factor = learned.given[index], learned.log_factors[index]
        own_arithmetic = type(handle).fake_quantize is ScaleHandle.fake_quantize
        self.symmetric = own_arithmetic and not bool(handle.zero_points().ne(0).any())  # read before any capture
        self.quantize: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None
        if self.symmetric:
            low, high = handle.clamp_range()
            self.quantize = lambda x, scale: affine_fake_quantize_with_mask(x, scale, None, low, high, handle.axis)
        elif own_arithmetic or type(handle).fake_quantize_with_mask is not ScaleHandle.fake_quantize_with_mask:
            self.quantize = handle.fake_quantize_with_mask
        else:  # a handle with its own arithmetic and no mask for it: differentiated op by op
            self.quantize = None

    def __call__(self, inputs: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.quantize is None:
            scale = self.base * self.log_factor.exp()
            return self.handle.fake_quantize(inputs, scale, straight_through=True).to(inputs.dtype)
        return _StraightThroughFakeQuant.apply(inputs, self.log_factor, self.learned.values[self.index],
                                               self.quantize, self.handle.axis)


class _StraightThroughFakeQuant(torch.autograd.Function):
    """``y = q(x, s)`` at ``s = base · exp(δ)`` with LSQ's straight-through gradients in closed form: ``∂y/∂x = m``
    and ``∂y/∂δ = s · ∂y/∂s = y − m · x``, ``m`` where the rounded value lies inside the integer range, its bounds
    included (there ``y = s · round(x / s)``; outside, ``y`` is the clipped bound times ``s``): the gradients of
    torch's own LSQ kernels (``torch._fake_quantize_learnable_per_*_affine``) and of recording the fake
    quantization's ops with straight-through rounding and clipping (up to rounding in the last bits: ``x · (1/s) ·
    s`` is not always ``x``), in 5 backward kernels instead of about 20: a CUDA-graphed step of a model with every
    op quantized is mostly these."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, log_factor: torch.Tensor, scale: torch.Tensor,
                quantize: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                axis: int | None) -> torch.Tensor:
        output, in_range = quantize(inputs, scale)  # scale = given · exp(log_factor), computed outside autograd
        output = output.to(inputs.dtype)
        ctx.save_for_backward(inputs, output, in_range)
        ctx.axis, ctx.factor_shape = axis, log_factor.shape
        return output

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        inputs, output, in_range = ctx.saved_tensors
        gradient_inputs = gradient * in_range if ctx.needs_input_grad[0] else None
        gradient_factor = None
        if ctx.needs_input_grad[1]:
            moves = gradient.float() * torch.where(in_range, output.float() - inputs.float(), output.float())
            if ctx.axis is None:
                gradient_factor = moves.sum()
            else:
                channel = ctx.axis % moves.dim()
                gradient_factor = moves.sum([d for d in range(moves.dim()) if d != channel])
            gradient_factor = gradient_factor.reshape(ctx.factor_shape)
        return gradient_inputs, gradient_factor, None, None, None


def _run_instead(module: torch.nn.Module, forward: Callable[..., torch.Tensor]) -> Callable[[], None]:
    """Make calls of ``module`` run ``forward`` instead of its own (an instance attribute shadows the class's
    method, set past a framework's own ``__setattr__``; its hooks still run). A forward hook replacing the output
    would run the quantizer's own fake quantization and throw it away: kernels a launch-bound step pays for on
    every quantizer. Returns what puts the previous forward back."""
    attributes = vars(module)
    previous = attributes.get("forward")
    attributes["forward"] = forward

    def restore() -> None:
        if previous is None:
            del attributes["forward"]
        else:
            attributes["forward"] = previous
    return restore


class _Graphed:
    """``step(images, reference)`` captured as one CUDA graph per distinct batch shape, replayed on copies of
    each batch (PyTorch's whole-network capture: warm-up on a side stream, then capture). The warm-up runs a real
    call, so the trained tensors are put back and ``reset_moments`` called afterwards (a training step moved
    them and the optimizer's moments); capturing itself computes nothing."""

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batches: list[torch.Tensor],
                 reference: list[torch.Tensor], trained: list[torch.Tensor], reset_moments: Callable[[], None]):
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        saved = [t.detach().clone() for t in trained]
        try:
            for images, ref in zip(batches, reference):
                shape = (tuple(images.shape), tuple(ref.shape))
                if shape in self.graphs:
                    continue
                static_images, static_reference = images.clone(), ref.clone()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                # kernels chosen, Adam's state allocated, outside the capture; a host sync (which a capture cannot
                # hold) raises here, naming the op, before a failed capture could leave the device half-captured
                previous = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    with torch.cuda.stream(side):
                        step(static_images, static_reference)
                finally:
                    torch.cuda.set_sync_debug_mode(previous)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    loss = step(static_images, static_reference)
                self.graphs[shape] = (graph, static_images, static_reference, loss)
        finally:  # the warm-up steps moved them; the capture did not
            with torch.no_grad():
                for tensor, value in zip(trained, saved):
                    tensor.copy_(value)
            reset_moments()

    def __call__(self, images: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        graph, static_images, static_reference, loss = self.graphs[(tuple(images.shape), tuple(ref.shape))]
        static_images.copy_(images)
        static_reference.copy_(ref)
        graph.replay()
        return loss
