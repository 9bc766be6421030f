"""ScaleHandles for torch.ao FX models: observers (PTQ), FakeQuantize (QAT), and weights of both."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.ao.quantization import QConfig
from torch.ao.quantization.fake_quantize import FakeQuantizeBase

from ..handles import NotCalibratedError, ScaleHandle
from .quantizers import DTYPE_RANGES, RefinedObserver, SimulatedQuantizer, is_fused_fake_quantize

__all__ = ["ObserverHandle", "FakeQuantizeHandle", "WeightObserverHandle", "clamp_weight_to_grid", "get_attribute",
           "set_submodule"]

logger = logging.getLogger(__name__)


def _axis(qscheme: torch.qscheme, ch_axis: int) -> int | None:
    return ch_axis if qscheme in (torch.per_channel_affine, torch.per_channel_symmetric,
                                  torch.per_channel_affine_float_qparams) else None


def get_attribute(root: nn.Module, path: str):
    """The module, tensor or value at dotted ``path`` under ``root`` (an FX ``get_attr``/``call_module`` target)."""
    value = root
    for part in path.split("."):
        value = getattr(value, part)
    return value


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def check_scale(name: str, scale: torch.Tensor) -> None:
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ValueError(
            f"quantizer {name} has a scale that is zero, negative or not finite ({scale.flatten()[:4].tolist()}...): "
            "calibrate the model on real images before refining it"
        )


def require_calibrated(name: str, observer) -> None:
    """Refuse an observer that never saw data (its min/max are still ±inf or empty)."""
    if isinstance(observer, RefinedObserver):
        return
    min_val = getattr(observer, "min_val", None)
    if isinstance(min_val, torch.Tensor) and (min_val.numel() == 0 or bool(torch.isinf(min_val).all())):
        raise NotCalibratedError(f"quantizer {name} was never calibrated: run calibration images through the "
                                 "prepared model (prepared(images)) before refining it")


def clamp_weight_to_grid(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
                         quant_max: int, axis: int | None) -> bool:
    """Clip ``weight`` in place to ``[(quant_min − zp)·s, (quant_max − zp)·s]``. Returns whether any value moved.

    ``convert_fx`` quantizes weights with the dtype's full range and ignores a narrowed quant_min/quant_max;
    clipped weights quantize to exactly the integers that the narrowed fake quantizer produces."""
    shape = [1] * weight.dim()
    if axis is not None:
        shape[axis] = -1
    s = scale.reshape(shape).to(weight)
    z = zero_point.reshape(shape).to(weight)
    low, high = (quant_min - z) * s, (quant_max - z) * s
    clipped = torch.maximum(torch.minimum(weight.detach(), high), low)
    changed = not torch.equal(clipped, weight.detach())
    with torch.no_grad():
        weight.copy_(clipped)
    return changed


class _QuantizerInfo:
    """dtype range bookkeeping shared by the FX handles."""

    dtype: torch.dtype
    quant_min: int
    quant_max: int
    axis: int | None

    @property
    def narrowed(self) -> bool:
        low, high = DTYPE_RANGES.get(self.dtype, (self.quant_min, self.quant_max))
        return (self.quant_min, self.quant_max) != (low, high)

    @property
    def clamps_weight(self) -> bool:
        """Whether :meth:`commit` clips the module's weight onto the narrowed grid (in place)."""
        return getattr(self, "weight", None) is not None and getattr(self, "clamp_weights", False) and self.narrowed

    def clip_weight(self) -> bool:
        """Clip the weight onto the narrowed grid of the current scale (when :attr:`clamps_weight`); whether any
        value moved."""
        return self.clamps_weight and clamp_weight_to_grid(self.weight, self.read(), self.zero_points(),
                                                           self.quant_min, self.quant_max, self.axis)


class _SimulatedScale(_QuantizerInfo):
    """A handle whose search moves the scale of its own :class:`SimulatedQuantizer` (``self.quantizer``); the
    model's observer learns the result only at ``commit``."""

    quantizer: SimulatedQuantizer

    def read(self) -> torch.Tensor:
        return self.quantizer.scale.clone()

    def zero_points(self) -> torch.Tensor:
        return self.quantizer.zero_point

    def set(self, scale: torch.Tensor) -> None:
        self.quantizer.scale.copy_(scale)

    @property
    def quantizer_module(self) -> nn.Module | None:
        return self.quantizer


class ObserverHandle(_SimulatedScale, ScaleHandle):
    """An activation observer of a ``prepare_fx`` model. The search moves a :class:`SimulatedQuantizer`;
    ``commit`` puts a :class:`RefinedObserver` at the observer's path so ``convert_fx`` uses the result."""

    def __init__(self, root: nn.Module, path: str, observer: nn.Module, clamp_to_dtype: bool,
                 role: str = "activation", refined_cls: type = RefinedObserver):
        self.root, self.name, self.observer, self.role, self.refined_cls = root, path, observer, role, refined_cls
        self.paths = [path]  # torch.ao shares one observer between several paths (shape ops): all move together
        require_calibrated(path, observer)
        scale, zero_point = observer.calculate_qparams()
        check_scale(path, scale)
        self._scale_shape, self._zero_point = scale.shape, zero_point
        self.dtype, self.quant_min, self.quant_max = observer.dtype, observer.quant_min, observer.quant_max
        self.axis = _axis(getattr(observer, "qscheme", torch.per_tensor_affine), getattr(observer, "ch_axis", 0))
        low, high = DTYPE_RANGES[self.dtype] if clamp_to_dtype else (self.quant_min, self.quant_max)
        self.quantizer = SimulatedQuantizer(scale, zero_point, low, high, self.axis)

    @property
    def input_module(self) -> nn.Module | None:
        """The simulated quantizer in the evaluation model (switched off, it passes its input through)."""
        return self.quantizer if self.role == "activation" else None

    def clamp_range(self) -> tuple[int, int]:
        """The simulated quantizer's (the integer type's full range, for ``convert_fx`` at 8 bits)."""
        return self.quantizer.quant_min, self.quantizer.quant_max

    def commit(self) -> None:
        scale = self.quantizer.scale.reshape(self._scale_shape).clone()
        refined = self.refined_cls.like(self.observer, scale, self._zero_point)
        for path in self.paths:
            set_submodule(self.root, path, refined)


class WeightObserverHandle(_SimulatedScale, ScaleHandle):
    """The weight of a Linear/Conv in a ``prepare_fx`` model. ``convert_fx`` builds the weight observer from
    the module's qconfig; ``commit`` replaces that qconfig's weight factory with a frozen RefinedObserver."""

    role = "weight"

    def __init__(self, path: str, module: nn.Module, clamp_weights: bool):
        self.name, self.module, self.clamp_weights = f"{path}.weight", module, clamp_weights
        self.qconfig = module.qconfig
        leader = module[0] if isinstance(module, nn.Sequential) else module
        self.weight = leader.weight
        observer = self.qconfig.weight()
        observer.to(self.weight.device)
        observer(self.weight.detach())
        scale, zero_point = observer.calculate_qparams()
        check_scale(self.name, scale)
        self.observer, self._scale_shape, self._zero_point = observer, scale.shape, zero_point
        self.dtype, self.quant_min, self.quant_max = observer.dtype, observer.quant_min, observer.quant_max
        self.axis = _axis(observer.qscheme, getattr(observer, "ch_axis", 0))
        self.quantizer = SimulatedQuantizer(scale, zero_point, self.quant_min, self.quant_max, self.axis)

    def commit(self) -> None:
        scale = self.quantizer.scale.reshape(self._scale_shape).clone()
        frozen = RefinedObserver.like(self.observer, scale, self._zero_point)
        self.module.qconfig = QConfig(
            activation=self.qconfig.activation,
            weight=RefinedObserver.with_args(
                scale=frozen.scale, zero_point=frozen.zero_point, dtype=frozen.dtype, qscheme=frozen.qscheme,
                quant_min=frozen.quant_min, quant_max=frozen.quant_max, ch_axis=frozen.ch_axis,
                eps=float(frozen.eps), averaging_constant=frozen.averaging_constant,
            ),
        )
        self.clip_weight()


class FakeQuantizeHandle(_QuantizerInfo, ScaleHandle):
    """A torch.ao FakeQuantize (``prepare_qat_fx``), for an activation or a QAT module's weight. The search
    writes the FakeQuantize's own ``scale`` buffer and evaluates through its own forward (observer off);
    ``commit`` also freezes its observer at that scale, because ``convert_fx`` reads
    ``calculate_qparams()``, which asks the observer."""

    def __init__(self, path: str, fake_quant: FakeQuantizeBase, role: str, weight: torch.Tensor | None = None,
                 clamp_weights: bool = True, refined_cls: type = RefinedObserver):
        self.name, self.fake_quant, self.role, self.refined_cls = path, fake_quant, role, refined_cls
        self.weight, self.clamp_weights = weight, clamp_weights
        require_calibrated(path, getattr(fake_quant, "activation_post_process", None))
        check_scale(path, fake_quant.scale)
        self.dtype, self.quant_min, self.quant_max = fake_quant.dtype, fake_quant.quant_min, fake_quant.quant_max
        self.axis = _axis(fake_quant.qscheme, getattr(fake_quant, "ch_axis", 0))

    def read(self) -> torch.Tensor:
        return self.fake_quant.scale.detach().clone()

    def zero_points(self) -> torch.Tensor:
        return self.fake_quant.zero_point

    def set(self, scale: torch.Tensor) -> None:
        with torch.no_grad():
            self.fake_quant.scale.copy_(scale)

    @property
    def input_module(self) -> nn.Module | None:
        """The FakeQuantize (its fake quantization switched off, it passes its input through); fused ones run
        through a view in the evaluation model and are not called themselves."""
        if self.role != "activation" or is_fused_fake_quantize(self.fake_quant):
            return None
        return self.fake_quant

    @property
    def quantizer_module(self) -> nn.Module | None:
        """The FakeQuantize, except fused ones (the evaluation model runs them through a view)."""
        return None if is_fused_fake_quantize(self.fake_quant) else self.fake_quant

    def commit(self) -> None:
        fq = self.fake_quant
        fq.activation_post_process = self.refined_cls.like(fq.activation_post_process, fq.scale.detach().clone(),
                                                           fq.zero_point.detach().clone())
        fq.disable_observer()
        self.clip_weight()
