"""Modules the FX integration puts in place of torch.ao's observers.

* :class:`SimulatedQuantizer` evaluates a candidate's scales with torch's own fake-quantize ops where the
  prepared model holds observers (which only record statistics).
* :class:`RefinedObserver` carries refined scales into ``convert_fx``: an observer whose
  ``calculate_qparams()`` returns exactly the stored scale and zero point and whose forward records nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from ..handles import clamp_values, round_values
from torch.ao.quantization.observer import ObserverBase

__all__ = ["SimulatedQuantizer", "SimulatedWeightModule", "RefinedObserver", "FakeQuantizeView",
           "is_fused_fake_quantize", "DTYPE_RANGES"]

DTYPE_RANGES = {
    torch.quint8: (0, 255), torch.qint8: (-128, 127), torch.uint8: (0, 255), torch.int8: (-128, 127),
    torch.qint32: (-(2**31), 2**31 - 1), torch.int32: (-(2**31), 2**31 - 1),
}


class SimulatedQuantizer(nn.Module):
    """``fake_quantize(x, scale, zero_point, quant_min, quant_max)``, per tensor or per channel."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int,
                 axis: int | None = None):
        super().__init__()
        self.register_buffer("scale", scale.detach().clone().float().reshape(-1 if axis is not None else 1))
        self.register_buffer("zero_point", zero_point.detach().clone().to(torch.int32).reshape(self.scale.shape))
        self.quant_min, self.quant_max, self.axis = int(quant_min), int(quant_max), axis
        self.enabled = True
        # the integer type's full range, for ONNX export (QuantizeLinear has no narrower range; weights are
        # clipped onto their narrowed grid first, so the exported values are the same)
        self.storage_range = (-128, 127) if quant_min < 0 else (0, 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if torch.onnx.is_in_onnx_export():  # torch's fake-quantize ops export as QuantizeLinear/DequantizeLinear
            low, high = self.storage_range
            if self.axis is None:
                return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, low, high)
            return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.axis, low, high)
        return fake_quantize(x, self.scale, self.zero_point, self.quant_min, self.quant_max, self.axis)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int,
                  axis: int | None = None) -> torch.Tensor:
    """The arithmetic of ``torch.fake_quantize_per_{tensor,channel}_affine`` (round(x · (1/s)) + z, clamp,
    minus z, times s), bit for bit.

    On CUDA it *is* that ATen op: one fused kernel that reads and writes each tensor once (memory traffic, not
    arithmetic, bounds fake quantization there). On the CPU the same arithmetic in plain tensor ops is about
    twice as fast as the ATen kernel with tensor qparams, which also builds a gradient mask the search never uses.
    Under autocast the CPU path quantizes in fp32 and returns the input's dtype. With gradients recorded (the
    gradient stage's step: the quantizers it does not move still run this) or while a CUDA graph is captured, the
    plain ops run on CUDA too: the per-channel ATen op reads its zero points on the host, which a captured step
    cannot do.
    """
    if x.is_cuda and not (torch.compiler.is_compiling() or torch.is_grad_enabled()
                          or torch.cuda.is_current_stream_capturing()):
        zero_point = zero_point.to(torch.int32)
        if axis is None:
            return torch.fake_quantize_per_tensor_affine(x, scale.float(), zero_point, quant_min, quant_max)
        return torch.fake_quantize_per_channel_affine(x, scale.float(), zero_point, axis, quant_min, quant_max)
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    dtype = x.dtype
    if dtype != torch.float32:  # bf16 cannot hold x / s exactly: quantize in fp32, return the input's dtype
        x = x.float()
    zero_point = zero_point.to(x.dtype)
    if x.requires_grad:  # the gradient stage: rounding passes gradients straight through, as ATen's kernel does
        q = clamp_values(round_values(x * (1.0 / scale), straight_through=True) + zero_point, quant_min, quant_max,
                         straight_through=True)
        return ((q - zero_point) * scale).to(dtype)
    q = torch.round(x * (1.0 / scale)).add_(zero_point).clamp_(quant_min, quant_max)
    return q.sub_(zero_point).mul_(scale).to(dtype)


def is_fused_fake_quantize(module: nn.Module) -> bool:
    """``FusedMovingAvgObsFakeQuantize`` (torch.ao's default QAT qconfig, torchao's PT2E QAT configs): its fused
    kernel recomputes the scale from the running min/max on every call, even with the observer off, so a scale
    written into its buffer would never be used."""
    return type(module).__name__ == "FusedMovingAvgObsFakeQuantize"


class FakeQuantizeView(nn.Module):
    """Fake-quantizes with a FakeQuantize's own ``scale``/``zero_point`` buffers and range, as ``convert_*``
    will (used in place of fused FakeQuantize modules while the search runs)."""

    def __init__(self, fake_quant: nn.Module):
        super().__init__()
        self.fake_quant = fake_quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fq = self.fake_quant
        if not bool(fq.fake_quant_enabled[0]):
            return x
        observer = fq.activation_post_process
        per_channel = fq.scale.numel() > 1 or getattr(fq, "is_per_channel", False)
        return fake_quantize(x, fq.scale.float(), fq.zero_point, observer.quant_min, observer.quant_max,
                             fq.ch_axis if per_channel else None)


class SimulatedWeightModule(nn.Module):
    """A Linear/Conv (or a torch.ao fused module led by one) whose weight passes through a quantizer."""

    def __init__(self, module: nn.Module, quantizer: SimulatedQuantizer):
        super().__init__()
        self.module = module
        self.weight_quantizer = quantizer

    @property
    def _leader(self) -> nn.Module:
        return self.module[0] if isinstance(self.module, nn.Sequential) else self.module

    def _quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight, recomputed only when the weight or its scale changed (always while gradients
        are recorded or the quantizer's forward is replaced: the gradient stage moves the scale outside the buffer,
        in a forward of its own)."""
        leader, quantizer = self._leader, self.weight_quantizer
        if torch.compiler.is_compiling() or torch.is_grad_enabled() or "forward" in vars(quantizer):
            # inside torch.compile: no Python-side cache (reading versions/pointers would break the graph, and each
            # break recompiles per weight shape until dynamo's recompile limit sends the model back to eager)
            return quantizer(leader.weight.detach())
        key = (leader.weight._version, quantizer.scale._version, quantizer.enabled, leader.weight.data_ptr(),
               quantizer.scale.data_ptr())
        cached = self.__dict__.get("_cache")
        if cached is None or cached[0] != key:
            cached = (key, quantizer(leader.weight.detach()))
            self.__dict__["_cache"] = cached  # not a buffer: never saved, never moved
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leader = self._leader
        weight = self._quantized_weight()
        if isinstance(leader, nn.Linear):
            out = nn.functional.linear(x, weight, leader.bias)
        else:
            out = leader._conv_forward(x, weight, leader.bias)
        if isinstance(self.module, nn.Sequential):
            for rest in list(self.module)[1:]:
                out = rest(out)
        return out


class _FrozenQParams:
    """An observer frozen at refined quantization parameters.

    ``convert_fx`` / ``convert_pt2e`` (and FakeQuantize's ``calculate_qparams``) read ``calculate_qparams()``, which
    returns the stored scale and zero point bit for bit; ``forward`` records nothing, so later calibration passes
    cannot overwrite the refinement. It keeps the replaced observer's dtype, qscheme, range and channel axis.
    """

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, dtype: torch.dtype = torch.quint8,
                 qscheme: torch.qscheme = torch.per_tensor_affine, quant_min: int = 0, quant_max: int = 255,
                 ch_axis: int = 0, eps: float = torch.finfo(torch.float32).eps, averaging_constant: float = 0.01):
        super().__init__(dtype=dtype, is_dynamic=False)
        self.qscheme = qscheme
        self.quant_min, self.quant_max, self.ch_axis = int(quant_min), int(quant_max), int(ch_axis)
        self.averaging_constant = averaging_constant
        self.register_buffer("eps", torch.tensor([eps]))
        scale = scale.detach().clone().float()
        zero_point = zero_point.detach().clone()
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        # the range these qparams represent, for code that reads an observer's min_val / max_val
        self.register_buffer("min_val", (quant_min - zero_point).float() * scale)
        self.register_buffer("max_val", (quant_max - zero_point).float() * scale)

    @classmethod
    def like(cls, observer: nn.Module, scale: torch.Tensor, zero_point: torch.Tensor):
        """A RefinedObserver with ``observer``'s dtype, qscheme, range and axis."""
        eps = getattr(observer, "eps", torch.finfo(torch.float32).eps)
        eps = float(eps.reshape(-1)[0]) if isinstance(eps, torch.Tensor) else float(eps)
        qscheme = getattr(observer, "qscheme", torch.per_tensor_affine)
        refined = cls(scale, zero_point, dtype=observer.dtype, qscheme=qscheme, quant_min=observer.quant_min,
                      quant_max=observer.quant_max, ch_axis=getattr(observer, "ch_axis", 0), eps=eps,
                      averaging_constant=getattr(observer, "averaging_constant", 0.01))
        return refined.to(scale.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def calculate_qparams(self):
        return self.scale.clone(), self.zero_point.clone()

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, qscheme={self.qscheme}, quant_min={self.quant_min}, quant_max={self.quant_max}"


class RefinedObserver(_FrozenQParams, ObserverBase):
    __doc__ = _FrozenQParams.__doc__


_PT2E_REFINED: list[type] = []


def _pt2e_refined_observer() -> type:
    """The same frozen observer as a subclass of torchao's PT2E ``ObserverBase`` (``convert_pt2e`` only converts
    torchao's observer classes)."""
    if not _PT2E_REFINED:
        from torchao.quantization.pt2e import ObserverBase as PT2EObserverBase

        class RefinedPT2EObserver(_FrozenQParams, PT2EObserverBase):
            __doc__ = _FrozenQParams.__doc__

        RefinedPT2EObserver.__module__ = __name__
        globals()["RefinedPT2EObserver"] = RefinedPT2EObserver  # picklable by qualified name
        _PT2E_REFINED.append(RefinedPT2EObserver)
    return _PT2E_REFINED[0]
