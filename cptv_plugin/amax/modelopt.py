"""NVIDIA ModelOpt: refine the ``amax`` of the ``TensorQuantizer``s that ``mtq.quantize`` inserted.

Candidates run through ModelOpt's own fake-quant forward; the full-precision reference is the same model with
its quantizers disabled. The refined ``amax`` is ModelOpt's own state, so ``mto.save`` and ModelOpt's ONNX
export carry it unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .._io import atomic_path
from ..config import SearchConfig, SearchConfigLike
from ..refinement import run_refinement
from ..search import RefineResult
from .session import AmaxSession, QuantizerKind, integer_fake_quant

__all__ = ["refine_modelopt", "refine_modelopt_checkpoint", "check_checkpoint_paths", "is_modelopt_model",
           "modelopt_kind", "COMPILABLE_BACKEND"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'cptv_plugin[modelopt]' (nvidia-modelopt 0.47 and requests)"


# the name under which cptv_plugin registers its compilable fake quantization with ModelOpt (``backend``)
COMPILABLE_BACKEND = "cptv_plugin_integer_fake_quant"


def _accepts_integer_fake_quant(quantizer: nn.Module) -> bool:
    """Quantizers whose fake quantization ``integer_fake_quant`` reproduces (the ones cptv_plugin refines)."""
    return (getattr(quantizer, "backend", None) is None and getattr(quantizer, "bias_calibrator", None) is None
            and quantizer.block_sizes is None and isinstance(quantizer.num_bits, int)
            and getattr(quantizer, "_amax", None) is not None and bool(quantizer.fake_quant))


_CONVOLUTIONS = {nn.Conv1d: torch.nn.functional.conv1d, nn.Conv2d: torch.nn.functional.conv2d,
                 nn.Conv3d: torch.nn.functional.conv3d}


class _PlainForward:
    """The forward of a ModelOpt ``QuantLinear``/``QuantConv`` that holds its quantizers, weight and bias directly
    instead of reaching them through ModelOpt's dynamic-attribute machinery, which dynamo in torch 2.11 cannot
    trace (``'_FoldedCallback' object has no attribute '_callbacks'``). The computation of ModelOpt's own forward:
    input quantizer, weight quantizer, the layer's functional op, output quantizer. An object, not a closure, so
    that a deep copy of the layer (a shared compiled block) computes with the copy's own tensors."""

    def __init__(self, module: nn.Module, functional: Callable, options: tuple):
        self.input_quantizer, self.weight_quantizer = module.input_quantizer, module.weight_quantizer
        self.output_quantizer = module.output_quantizer
        self.weight, self.bias = module._parameters["weight"], module._parameters.get("bias")
        self.functional, self.options = functional, options

    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.weight_quantizer(self.weight)
        output = self.functional(self.input_quantizer(input), weight, self.bias, *self.options)
        return self.output_quantizer(output)

    @classmethod
    def of(cls, module: nn.Module) -> _PlainForward | None:
        """For a quantized Linear/Conv with plain TensorQuantizers and its class's own forward (ModelOpt keeps a
        forward patched before quantization as ``_forward_pre_dm`` and calls it); else ``None``."""
        from modelopt.torch.quantization.nn import TensorQuantizer

        names = ("input_quantizer", "weight_quantizer", "output_quantizer")
        patched = "forward" in vars(module) or hasattr(module, "_forward_pre_dm")
        if patched or not all(type(getattr(module, n, None)) is TensorQuantizer for n in names):
            return None
        if isinstance(module, nn.Linear):
            return cls(module, torch.nn.functional.linear, ())
        for convolution, functional in _CONVOLUTIONS.items():
            if isinstance(module, convolution) and module.padding_mode == "zeros":
                return cls(module, functional, (module.stride, module.padding, module.dilation, module.groups))
        return None


@contextlib.contextmanager
def _compilable(model: nn.Module, quantizers: list[nn.Module]) -> Iterator[bool]:
    """While the context lasts, make ``model`` traceable whole by ``torch.compile``: its enabled ``quantizers`` run
    ``integer_fake_quant`` (registered through ModelOpt's own ``register_quant_backend`` hook) and its quantized
    Linear/Conv layers a plain forward (``_PlainForward``). Yields whether every quantizer could be routed
    (otherwise nothing is changed, and compiling would not pay). Everything is put back on exit."""
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import (is_registered_quant_backend,
                                                                          register_quant_backend)

    if not all(_accepts_integer_fake_quant(q) for q in quantizers):
        yield False
        return
    if not is_registered_quant_backend(COMPILABLE_BACKEND):
        register_quant_backend(COMPILABLE_BACKEND, integer_fake_quant)
    forwards = {module: forward for module in model.modules() if (forward := _PlainForward.of(module)) is not None}
    for quantizer in quantizers:
        quantizer.backend = COMPILABLE_BACKEND
    for module, forward in forwards.items():
        vars(module)["forward"] = forward  # an instance attribute, past ModelOpt's own __setattr__
    try:
        yield True
    finally:
        for quantizer in quantizers:
            quantizer.backend = None
        for module in forwards:
            del vars(module)["forward"]


def modelopt_kind() -> QuantizerKind:
    try:
        from modelopt.torch.quantization.nn import TensorQuantizer
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError(f"refine_modelopt needs NVIDIA ModelOpt: {INSTALL_HINT}") from error
    return QuantizerKind(
        framework="modelopt",
        quantizer_type=TensorQuantizer,
        is_enabled=lambda q: bool(q.is_enabled),
        enable=lambda q: q.enable(),
        disable=lambda q: q.disable(),
        is_calibrating=lambda q: bool(getattr(q, "_if_calib", False)),
        compilable=_compilable,
    )


def is_modelopt_model(model: nn.Module) -> bool:
    """Whether ``model`` holds ModelOpt quantizers (False when ModelOpt is not installed)."""
    try:
        from modelopt.torch.quantization.nn import TensorQuantizer
    except ImportError:
        return False
    return any(isinstance(m, TensorQuantizer) for m in model.modules())


def refine_modelopt(model: nn.Module, calib_data, *, config: SearchConfigLike = None,
                    fp_model: nn.Module | None = None, blocks: list[str] | None = None) -> RefineResult:
    """Refine the ``amax`` of a model returned by ``mtq.quantize`` in place with CPT-V's block-wise search.

    Args:
        model: the quantized, calibrated model (e.g. ``mtq.quantize(model, mtq.INT8_DEFAULT_CFG, loop)``).
        calib_data: calibration images (tensor, list of tensors or DataLoader).
        config: search settings: a ``SearchConfig``, a preset name (``"fast"``), a mapping of settings, or ``None``
            for our default preset (``SearchConfig.resolve``).
        fp_model: the full-precision model to match; ``None`` uses ``model`` with its quantizers disabled.
        blocks: module paths of the blocks, to skip automatic block discovery.

    Example:
        >>> model = mtq.quantize(model, mtq.INT8_DEFAULT_CFG, forward_loop)
        >>> cptv_plugin.refine_modelopt(model, images)
        >>> mto.save(model, "refined.pth")
    """
    config = SearchConfig.resolve(config)
    session = AmaxSession(model, modelopt_kind(), blocks=blocks, roles=config.roles,
                          search_outside_blocks=config.search_outside_blocks)
    return run_refinement(session, calib_data, config, fp_model)


def check_checkpoint_paths(checkpoint: str | os.PathLike, output: str | os.PathLike,
                           overwrite: bool = False, onnx: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Refuse, before any work, a ``checkpoint`` that is not a file, an ``output`` (or ``onnx`` file) that is the
    checkpoint itself (the input is never modified), an ``onnx`` path equal to ``output``, and an existing output
    unless ``overwrite``; returns the checkpoint and output as paths."""
    checkpoint, output = Path(checkpoint), Path(output)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"ModelOpt checkpoint {checkpoint} does not exist")
    written = {"output": output, **({"onnx": Path(onnx)} if onnx is not None else {})}
    for label, path in written.items():
        if path.resolve() == checkpoint.resolve():
            raise ValueError(f"{label} {path} is the input checkpoint: cptv_plugin never modifies its input; "
                             "choose another path")
        if path.is_dir():
            raise IsADirectoryError(f"{label} {path} is a folder; give a file path")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    if onnx is not None and Path(onnx).resolve() == output.resolve():
        raise ValueError(f"onnx {onnx} is also the output checkpoint: give the ONNX file its own path")
    return checkpoint, output


def refine_modelopt_checkpoint(checkpoint: str | os.PathLike, model: str | Callable[..., nn.Module],
                               calibration: str | os.PathLike, output: str | os.PathLike, *,
                               model_kwargs: dict | None = None, config: SearchConfigLike = None,
                               calibration_size: int = 1000, seed: int = 0, overwrite: bool = False,
                               device: str | torch.device | None = None,
                               onnx: str | os.PathLike | None = None) -> RefineResult:
    """Post-process a ModelOpt checkpoint (``mto.save``) before TensorRT export: restore it, refine its
    ``amax`` on ``device``, save a new checkpoint that ``mto.restore`` loads and, with ``onnx``, the ONNX file
    with Q/DQ nodes that TensorRT builds its engine from.

    The input file is only read; the output is written to a temporary file and renamed into place, from the CPU
    (it loads where the input did). Under torchrun (``SearchConfig.distributed``) every rank refines with its model
    on its ``device`` and rank 0 writes the file.

    Args:
        checkpoint: the file ``mto.save`` wrote.
        model: the constructor of the full-precision model: ``"timm:deit_tiny_patch16_224"``,
            ``"cptv:fmnist_vit_tiny"``, ``"package.module:function"`` or a callable.
        calibration: ``"fashion-mnist"``, a folder of images (ImageNet layout or flat) or a tensor file.
        output: the refined checkpoint to write (must differ from ``checkpoint``).
        model_kwargs: keyword arguments of the constructor (e.g. ``{"num_classes": 10}``).
        calibration_size: number of calibration images drawn (reproducibly from ``seed``).
        overwrite: allow replacing an existing ``output`` file.
        device: where the refinement runs; ``None``: the current CUDA device if there is one, else the CPU.
        onnx: also write the refined model as ONNX for TensorRT (:func:`cptv_plugin.export_onnx`: opset 17,
            dynamic batch, checked against TensorRT's Q/DQ rules). Activations below 8 bits, which int8 Q/DQ
            cannot express, are refused before the refinement starts.
    """
    import modelopt.torch.opt as mto

    from ..datasets import load_calibration_source
    from ..models import build_model

    checkpoint, output = check_checkpoint_paths(checkpoint, output, overwrite, onnx)
    config = SearchConfig.resolve(config)
    if config.seed != seed:
        config = config.replace(seed=seed)
    quantized = build_model(model, **(model_kwargs or {})).eval()
    try:
        quantized = mto.restore(quantized, str(checkpoint))
    except Exception as error:
        raise ValueError(f"mto.restore could not load {checkpoint} into {model!r}: {error}. Pass the same "
                         "constructor and kwargs that built the model before it was quantized.") from error
    if not is_modelopt_model(quantized):
        raise ValueError(f"{checkpoint} holds no ModelOpt quantizers: was it saved after mtq.quantize?")
    if onnx is not None:
        from ..export import refuse_amax_narrowed_activations

        refuse_amax_narrowed_activations(quantized, "modelopt")
    images = load_calibration_source(calibration, quantized, calibration_size, seed)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    quantized.to(device)
    result = refine_modelopt(quantized, images.to(device), config=config)
    if result.ranks > 1 and torch.distributed.get_rank() != 0:
        return result  # under torchrun every rank holds the same refined model: rank 0 writes it
    quantized.cpu()
    with atomic_path(output) as temporary:
        mto.save(quantized, str(temporary))
    logger.info("refined checkpoint written to %s (%s)", output, result)
    if onnx is not None:
        from ..export import export_onnx

        export_onnx(quantized, onnx, images[:1].cpu())
    return result
