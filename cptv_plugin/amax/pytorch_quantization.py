"""pytorch-quantization (NVIDIA, 2.1.3): refine the ``amax`` of ``QuantLinear`` / ``QuantConv2d`` quantizers.

``quant_modules.initialize()`` monkey-patches ``nn.Linear`` with a constructor that rejects the
``device``/``dtype`` keyword arguments timm ≥ 1.0 passes, so :func:`quantize_pytorch_quantization` swaps the
layers of an already-built model instead (weights copied, nothing else touched) and calibrates them with
pytorch-quantization's own ``MaxCalibrator``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import nn

from ..config import SearchConfig, SearchConfigLike
from ..data import calibration_batches
from ..qconfigs import parse_bits
from ..refinement import run_refinement
from ..search import RefineResult
from .session import AmaxSession, QuantizerKind, integer_fake_quant

__all__ = ["refine_pytorch_quantization", "quantize_pytorch_quantization", "is_pytorch_quantization_model",
           "pytorch_quantization_kind"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'cptv_plugin[pytorch-quantization]' (pytorch-quantization==2.1.3)"


def _tensor_quantizer_type():
    try:
        from pytorch_quantization.nn import TensorQuantizer
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError(f"this needs pytorch-quantization: {INSTALL_HINT}") from error
    return TensorQuantizer


def pytorch_quantization_kind() -> QuantizerKind:
    return QuantizerKind(
        framework="pytorch-quantization",
        quantizer_type=_tensor_quantizer_type(),
        is_enabled=lambda q: not q._disabled,
        enable=lambda q: q.enable(),
        disable=lambda q: q.disable(),
        is_calibrating=lambda q: bool(q._if_calib) or not bool(q._if_quant),
        set_amax=_set_amax,
        compilable=_compilable,
    )


class _QuantizerForward:
    """A pytorch-quantization quantizer's fake quantization as ``integer_fake_quant`` (its own forward logs on every
    call, which breaks torch.compile's graph). An object, not a closure, so that a deep copy of the quantizer
    (a shared compiled block) quantizes with the copy's own ``amax``."""

    def __init__(self, quantizer: nn.Module):
        self.quantizer = quantizer

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        return integer_fake_quant(inputs, self.quantizer)


@contextlib.contextmanager
def _compilable(model: nn.Module, quantizers: list[nn.Module]) -> Iterator[bool]:
    """While the context lasts, the enabled ``quantizers`` run ``integer_fake_quant`` (the same arithmetic as their
    ``fake_tensor_quant``); yields whether all of them could (not with ONNX-export fake quant, learned or clipped
    ranges, or real quantization), otherwise nothing is changed. Put back on exit."""
    quantizer_type = _tensor_quantizer_type()
    if quantizer_type.use_fb_fake_quant or not all(
            q._fake_quant and not q._learn_amax and not q._if_clip and hasattr(q, "_amax") for q in quantizers):
        yield False
        return
    for quantizer in quantizers:
        vars(quantizer)["forward"] = _QuantizerForward(quantizer)
    try:
        yield True
    finally:
        for quantizer in quantizers:
            del vars(quantizer)["forward"]


def _set_amax(quantizer: nn.Module, amax: torch.Tensor) -> None:
    # the ``amax`` setter warns on tensors and re-creates the buffer; write into the calibrated buffer instead
    quantizer._amax.data.copy_(amax.reshape(quantizer._amax.shape))


def is_pytorch_quantization_model(model: nn.Module) -> bool:
    """Whether ``model`` holds pytorch-quantization quantizers (False when it is not installed)."""
    try:
        quantizer_type = _tensor_quantizer_type()
    except ImportError:
        return False
    return any(isinstance(m, quantizer_type) for m in model.modules())


def quantize_pytorch_quantization(model: nn.Module, bits: str, calib_data, *, batch_size: int = 100,
                                  skip: tuple[str, ...] = ()) -> nn.Module:
    """Swap every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` for pytorch-quantization's quantized layer and
    calibrate the ranges with ``MaxCalibrator`` (per-channel weights on the output channel, per-tensor signed
    activations, as TensorRT expects). Returns ``model``, changed in place. A layer whose forward never runs in
    calibration (the model reads its weight directly, as torchvision Swin's attention does with ``qkv`` and
    ``proj``) gets its original module back, with a log line: it could not be calibrated, and it is never run.

    Args:
        bits: e.g. ``"W4A8"``.
        calib_data: calibration images.
        skip: module paths to leave in floating point.
    """
    from pytorch_quantization import nn as quant_nn
    from pytorch_quantization.tensor_quant import QuantDescriptor

    weight_bits, activation_bits = parse_bits(bits)
    weight_desc = QuantDescriptor(num_bits=weight_bits, axis=(0,))
    input_desc = QuantDescriptor(num_bits=activation_bits, calib_method="max")
    originals: dict[str, nn.Module] = {}
    for path, module in list(model.named_modules()):
        if path in skip or type(module) not in (nn.Linear, nn.Conv2d):
            continue
        if isinstance(module, nn.Linear):
            quantized = quant_nn.QuantLinear(module.in_features, module.out_features, module.bias is not None,
                                             quant_desc_input=input_desc, quant_desc_weight=weight_desc)
        else:
            quantized = quant_nn.QuantConv2d(
                module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, module.groups, module.bias is not None, module.padding_mode,
                quant_desc_input=input_desc, quant_desc_weight=weight_desc)
        quantized.load_state_dict(module.state_dict(), strict=False)
        quantized.to(module.weight.device).train(module.training)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, quantized)
        originals[path] = module
    quantizers = [m for m in model.modules() if isinstance(m, quant_nn.TensorQuantizer)]
    for quantizer in quantizers:
        quantizer.disable_quant()
        quantizer.enable_calib()
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    with torch.no_grad():
        for batch in calibration_batches(calib_data, batch_size):
            model(batch.to(device))
    never_ran = [path for path in originals if model.get_submodule(path)._input_quantizer._calibrator.compute_amax()
                 is None]
    for path in never_ran:  # calibration never reached them: keep the float layer the model bypasses anyway
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, originals[path])
    if never_ran:
        logger.warning("%d layer(s) never ran in the calibration forward (e.g. %s: the model reads its weight "
                       "directly) and stay in floating point", len(never_ran), never_ran[0])
    quantizers = [m for m in model.modules() if isinstance(m, quant_nn.TensorQuantizer)]
    for quantizer in quantizers:
        quantizer.load_calib_amax()
        quantizer.disable_calib()
        quantizer.enable_quant()
    model.train(training)
    logger.info("pytorch-quantization: %d layers quantized at %s and calibrated", len(quantizers) // 2, bits)
    return model


def refine_pytorch_quantization(model: nn.Module, calib_data, *, config: SearchConfigLike = None,
                                fp_model: nn.Module | None = None, blocks: list[str] | None = None
                                ) -> RefineResult:
    """Refine the ``amax`` of a calibrated pytorch-quantization model in place with CPT-V's search.

    Args:
        model: a model built from ``QuantLinear`` / ``QuantConv2d`` whose ``TensorQuantizer``s were calibrated
            (e.g. by :func:`quantize_pytorch_quantization`).
        calib_data: calibration images.
        config: search settings: a ``SearchConfig``, a preset name (``"fast"``), a mapping of settings, or ``None``
            for our default preset (``SearchConfig.resolve``).
        fp_model: the full-precision model to match; ``None`` uses ``model`` with its quantizers disabled.
        blocks: module paths of the blocks, to skip automatic block discovery.
    """
    config = SearchConfig.resolve(config)
    session = AmaxSession(model, pytorch_quantization_kind(), blocks=blocks, roles=config.roles,
                          search_outside_blocks=config.search_outside_blocks)
    return run_refinement(session, calib_data, config, fp_model)
