"""The core vocabulary shared by every framework integration: ScaleHandle and Group (DESIGN.md)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

__all__ = ["ScaleHandle", "Group", "SearchState", "set_groups", "affine_fake_quantize",
           "affine_fake_quantize_with_mask", "NotCalibratedError"]


class NotCalibratedError(ValueError):
    """A quantizer has no calibrated range (an observer that saw no data, an ``amax`` never set, a calibrator
    still collecting statistics): run calibration images through the model before refining it."""


class _RoundStraightThrough(torch.autograd.Function):
    """``torch.round`` whose gradient is the identity: one op forward and none backward, where ``x + (round(x) −
    x).detach()`` costs three forward and one more backward (each a kernel in a CUDA-graphed gradient step)."""

    @staticmethod
    def forward(ctx, values: torch.Tensor) -> torch.Tensor:
        return torch.round(values)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> torch.Tensor:
        return gradient


class _ClampStraightThrough(torch.autograd.Function):
    """``torch.clamp`` whose gradient passes where the value lies inside ``[low, high]``, bounds included (as in
    torch's own fake quantize kernels), whatever torch's version: torch.clamp's own gradient at its bounds is 1 in
    torch 2.11 and 0 in 2.14, and at low bits many rounded values sit on a bound."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, low: float, high: float) -> torch.Tensor:
        ctx.save_for_backward(values)
        ctx.low, ctx.high = low, high
        return torch.clamp(values, low, high)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        values, = ctx.saved_tensors
        return gradient * ((values >= ctx.low) & (values <= ctx.high)), None, None


def clamp_values(values: torch.Tensor, low: float, high: float, straight_through: bool = False) -> torch.Tensor:
    """``clamp(values, low, high)``; with ``straight_through`` its gradient is 1 inside the range, bounds included
    (the straight-through estimator of a fake quantization's clipping)."""
    return _ClampStraightThrough.apply(values, low, high) if straight_through else torch.clamp(values, low, high)


def round_values(values: torch.Tensor, straight_through: bool = False) -> torch.Tensor:
    """``round(values)`` (half to even); with ``straight_through`` its gradient is the identity (STE)."""
    return _RoundStraightThrough.apply(values) if straight_through else torch.round(values)


def affine_fake_quantize(inputs: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, low: int,
                         high: int, axis: int | None, straight_through: bool = False) -> torch.Tensor:
    """``(clamp(round(x · (1/s)) + z, low, high) − z) · s`` in the input's dtype, per tensor (``axis`` None) or per
    channel along ``axis`` (see :meth:`ScaleHandle.fake_quantize`). ``zero_point`` None: 0 everywhere, two ops
    fewer (the same values; for a symmetric quantizer that is known to be so)."""
    return _affine(inputs, scale, zero_point, low, high, axis, straight_through, with_mask=False)[0]


def affine_fake_quantize_with_mask(inputs: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                                   low: int, high: int, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`affine_fake_quantize` and where its rounded value lies inside ``[low, high]`` (not clipped)."""
    return _affine(inputs, scale, zero_point, low, high, axis, False, with_mask=True)


_FUSED_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _fused_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel's zero point 0 and its on switch, made once per device (two fill kernels fewer in every
    call of a CUDA-graphed step); never made while a CUDA graph is being captured (memory of the graph's pool is
    reused once the graph is gone)."""
    if device not in _FUSED_CONSTANTS:
        constants = (torch.zeros(1, dtype=torch.int32, device=device), torch.ones(1, dtype=torch.long, device=device))
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return constants
        _FUSED_CONSTANTS[device] = constants
    return _FUSED_CONSTANTS[device]


def _affine(inputs: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, low: int, high: int,
            axis: int | None, straight_through: bool, with_mask: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if with_mask and axis is None and inputs.is_cuda and inputs.dtype == torch.float32 and scale.numel() == 1:
        # on CUDA torch's fused kernel, output and mask in one (eight kernels in plain ops; the gradient stage's
        # CUDA-graphed step is mostly these). The same arithmetic as torch.ao's FakeQuantize, bit for bit. Its
        # scale, zero point and switch are read on the device: a CUDA graph can capture it (the per-channel kernel
        # reads its zero points on the host and cannot be captured)
        zero_default, enabled = _fused_constants(inputs.device)
        zero = zero_default if zero_point is None else zero_point.to(inputs.device, torch.int32).reshape(1)
        return torch._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
            inputs, scale.to(inputs.device, torch.float32).reshape(1), zero, enabled, low, high)
    scale = scale.to(inputs.device, inputs.dtype)
    if zero_point is not None:
        zero_point = zero_point.to(inputs.device, inputs.dtype)
    if axis is not None:
        shape = [1] * inputs.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero_point = None if zero_point is None else zero_point.reshape(shape)
    elif zero_point is not None:
        zero_point = zero_point.reshape(())
    rounded = round_values(inputs * (1.0 / scale), straight_through)
    if zero_point is not None:
        rounded = rounded + zero_point
    clamped = clamp_values(rounded, low, high, straight_through)
    output = clamped * scale if zero_point is None else (clamped - zero_point) * scale
    return output, (rounded == clamped) if with_mask else None


class ScaleHandle(ABC):
    """One quantizer's scale, as the framework stores it.

    The search reads the scale with :meth:`read`, moves it with :meth:`set` (which changes what the
    evaluation forward computes) and, once it is done, :meth:`commit` writes the final value in the
    framework's own units so that the framework's next step (convert, save, export) carries it.
    """

    name: str
    role: str  # "weight" or "activation"
    quant_min: int
    quant_max: int
    weight: torch.Tensor | None = None  # for weight scales: the tensor quantized, where the framework shows it
    axis: int | None  # None for per-tensor

    @property
    def bits(self) -> int:
        return int(self.quant_max - self.quant_min + 1).bit_length() - 1

    @abstractmethod
    def read(self) -> torch.Tensor:
        """The scale in use now: a float32 tensor (one element per tensor, one per channel per channel)."""

    @abstractmethod
    def set(self, scale: torch.Tensor) -> None:
        """Use ``scale`` in the evaluation forward from now on."""

    @abstractmethod
    def commit(self) -> None:
        """Write the scale in use into the framework's own state (called once, after the search)."""

    def zero_points(self) -> torch.Tensor:
        """Zero point(s) of the quantizer in use (0 for the symmetric quantizers of amax-based frameworks)."""
        return torch.zeros(1, dtype=torch.int32)

    @property
    def input_module(self) -> torch.nn.Module | None:
        """For an activation scale: the module that is called with the tensor this scale quantizes, also while
        quantization is switched off (data-driven starts hook it to see that tensor); ``None`` where there is none
        or the tensor it sees is not the one quantized."""
        return None

    def clamp_range(self) -> tuple[int, int]:
        """The integer range the evaluation forward clamps to (``quant_min, quant_max`` unless the framework
        clamps to another one)."""
        return self.quant_min, self.quant_max

    @property
    def quantizer_module(self) -> torch.nn.Module | None:
        """The module of the evaluation model whose call returns this quantizer's output, ``fake_quantize(x,
        read())`` of its input ``x``; ``None`` where the framework quantizes without calling one (the gradient
        stage then leaves this scale where the search put it)."""
        return None

    def fake_quantize(self, inputs: torch.Tensor, scale: torch.Tensor,
                      straight_through: bool = False) -> torch.Tensor:
        """``inputs`` quantized and dequantized with ``scale`` and this quantizer's zero point and integer range:
        the arithmetic of the evaluation forward (``round(x · (1/s)) + z``, clamp, ``− z``, ``· s``), for judging a
        scale without running the model. ``scale`` is shaped like :meth:`read`; for a per-tensor quantizer any
        shape that broadcasts against ``inputs`` (several candidate scales at once). ``straight_through``: the
        rounding passes gradients through unchanged (the straight-through estimator), so that the result is
        differentiable in ``scale`` (LSQ's gradient) and ``inputs``."""
        return affine_fake_quantize(inputs, scale, self.zero_points(), *self.clamp_range(), self.axis,
                                    straight_through)

    def fake_quantize_with_mask(self, inputs: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`fake_quantize` (no gradient) and where the rounded value lies inside the integer range: there
        the straight-through gradient passes to the input, elsewhere the output is the clipped bound. A handle
        that overrides :meth:`fake_quantize` overrides this too, or the gradient stage differentiates its
        :meth:`fake_quantize` op by op (slower, the same gradients)."""
        return affine_fake_quantize_with_mask(inputs, scale, self.zero_points(), *self.clamp_range(), self.axis)

    def describe(self) -> str:
        grain = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        return f"{self.name} [{self.role}, {self.bits}-bit {grain}]"


@dataclass
class Group:
    """Scales the search moves together (the paper's Δ_b) and the segment the search re-runs from.

    ``segment`` is the index of the first model segment whose output depends on these scales: candidates
    re-run only segments ``segment…`` from a cache of that segment's inputs.
    """

    name: str
    handles: list[ScaleHandle]
    segment: int = 0
    module_paths: list[str] = field(default_factory=list)

    def read(self) -> torch.Tensor:
        return torch.cat([h.read().reshape(-1).float() for h in self.handles]) if self.handles else torch.empty(0)

    def set(self, vector: torch.Tensor) -> None:
        offset = 0
        for handle in self.handles:
            current = handle.read()
            count = current.numel()
            handle.set(vector[offset : offset + count].reshape(current.shape).to(current.device, current.dtype))
            offset += count

    def __len__(self) -> int:
        return sum(h.read().numel() for h in self.handles)


def set_groups(groups: list[Group], vectors: list[torch.Tensor]) -> None:
    """Set each group to its vector (one per group, as :meth:`Group.read` gives them, on any device)."""
    for group, vector in zip(groups, vectors):
        group.set(vector)


@dataclass
class SearchState:
    """What the search has to remember between group visits (for checkpoints and results)."""

    pass_index: int = 0
    group_index: int = 0
    history: list[dict] = field(default_factory=list)
