"""Which quantization framework a model comes from, and ``refine``: one call for all of them."""

from __future__ import annotations

from torch import nn

from .config import SearchConfigLike
from .search import RefineResult

__all__ = ["detect_framework", "refine", "UnsupportedFrameworkError", "quantizer_kind"]


class UnsupportedFrameworkError(TypeError):
    """The model holds no quantizer of a framework cptv_plugin supports."""


def detect_framework(model: nn.Module) -> str:
    """``"fx"`` (torch.ao ``prepare_fx``/``prepare_qat_fx``), ``"pt2e"`` (torchao ``prepare_pt2e``/
    ``prepare_qat_pt2e``), ``"modelopt"`` or ``"pytorch-quantization"``; raises
    :class:`UnsupportedFrameworkError` otherwise."""
    from .amax.modelopt import is_modelopt_model
    from .amax.pytorch_quantization import is_pytorch_quantization_model
    from .fx.refine import _observed_attrs
    from .pt2e import is_pt2e_prepared

    if is_pt2e_prepared(model):  # before FX: PT2E graphs carry FX's observed-graph metadata too
        return "pt2e"
    if _observed_attrs(model) is not None:
        return "fx"
    if is_modelopt_model(model):
        return "modelopt"
    if is_pytorch_quantization_model(model):
        return "pytorch-quantization"
    if any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules()):
        raise UnsupportedFrameworkError(
            "this model was already converted (convert_fx / convert_pt2e): its scales are baked into quantized "
            "kernels. Refine the prepared, calibrated model before converting it.")
    raise UnsupportedFrameworkError(
        f"{type(model).__name__} holds no quantizer cptv_plugin knows. Quantize and calibrate it first with "
        "torch.ao FX (prepare_fx), torchao PT2E (prepare_pt2e), NVIDIA ModelOpt (mtq.quantize) or "
        "pytorch-quantization (cptv_plugin.quantize_pytorch_quantization), then call refine on the result.")


REFINE_FUNCTIONS = {"fx": "refine_fx", "pt2e": "refine_pt2e", "modelopt": "refine_modelopt",
                    "pytorch-quantization": "refine_pytorch_quantization"}


def other_framework_hint(model: nn.Module, called: str) -> str:
    """For the error of ``refine_<called>`` on a model of another framework: a sentence naming the function that
    does take it (empty when the model is of no framework we know, or of ``called``'s own)."""
    try:
        framework = detect_framework(model)
    except UnsupportedFrameworkError:
        return ""
    if framework == called:
        return ""
    return (f" This model holds {framework} quantizers: call cptv_plugin.{REFINE_FUNCTIONS[framework]} on it, "
            "or cptv_plugin.refine, which recognises the framework.")


def quantizer_kind(framework: str):
    """The :class:`~cptv_plugin.amax.session.QuantizerKind` of an amax framework."""
    if framework == "modelopt":
        from .amax.modelopt import modelopt_kind

        return modelopt_kind()
    if framework == "pytorch-quantization":
        from .amax.pytorch_quantization import pytorch_quantization_kind

        return pytorch_quantization_kind()
    raise ValueError(f"{framework} quantizers do not hold an amax")


def refine(model: nn.Module, calib_data, *, config: SearchConfigLike = None, fp_model: nn.Module | None = None,
           blocks: list[str] | None = None, **options) -> RefineResult:
    """Refine a quantized model's scales in place, whichever supported framework quantized it.

    Dispatches to :func:`refine_fx`, :func:`refine_pt2e`, :func:`refine_modelopt` or
    :func:`refine_pytorch_quantization`; ``options`` go to the framework's function (e.g. ``target`` for FX).
    """
    framework = detect_framework(model)
    if framework == "fx":
        from .fx.refine import refine_fx as run
    elif framework == "pt2e":
        from .pt2e import refine_pt2e as run
    elif framework == "modelopt":
        from .amax.modelopt import refine_modelopt as run
    else:
        from .amax.pytorch_quantization import refine_pytorch_quantization as run
    return run(model, calib_data, config=config, fp_model=fp_model, blocks=blocks, **options)
