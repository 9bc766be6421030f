"""ONNX export for TensorRT's explicit quantization, and a checker of TensorRT's Q/DQ rules.

The export goes through torch's own ONNX exporter (TorchScript path, opset 17), where fake-quantize ops become
``QuantizeLinear``/``DequantizeLinear`` pairs, on a *copy* of the user's model prepared for it. A PT2E model is
converted (``convert_pt2e``, on the copy) and goes through torch's dynamo exporter instead (it needs onnxscript):
its weights become int8 constants read by a ``DequantizeLinear``, TensorRT's form of pre-quantized weights.

* weights narrower than 8 bits are clipped onto the grid they occupy and exported as int8 with the same scale,
  so the file holds exactly the low-bit integers that were optimized (TensorRT runs them as int8); FX weights are
  also written on the grid (k·s), so that no runtime's rounding of a halfway value can change them;
* activations narrower than 8 bits cannot be expressed by TensorRT's int8 Q/DQ: the export refuses them.

:func:`check_tensorrt_onnx` lists every rule a file breaks (TensorRT developer guide, "Working with
Quantized Types": int8, zero point 0, per-channel scales only on weights and on their output-channel axis,
per-tensor activation scales, Q immediately followed by a matching DQ, opset ≥ 13).
"""

from __future__ import annotations

import copy
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ._io import atomic_path
from .engine import _as_output_tensor
from .frameworks import detect_framework

__all__ = ["export_onnx", "check_tensorrt_onnx", "ExportError", "TensorRTRuleError"]

logger = logging.getLogger(__name__)


class ExportError(ValueError):
    """The model cannot be exported as a TensorRT explicit-quantization ONNX file."""


class TensorRTRuleError(ExportError):
    """The exported graph breaks TensorRT's Q/DQ rules; ``violations`` lists them."""

    def __init__(self, violations: list[str], hint: str = ""):
        self.violations = violations
        super().__init__("the exported ONNX breaks TensorRT's Q/DQ rules:\n  - " + "\n  - ".join(violations)
                         + (f"\n{hint}" if hint else ""))


# how to quantize activations without zero point, per framework (ModelOpt and pytorch-quantization always do)
_SYMMETRIC_ACTIVATIONS = {
    "fx": "prepare_fx with cptv_plugin.qconfigs.fx_qconfig_mapping(bits, symmetric_activations=True) and "
          "backend_config=get_tensorrt_backend_config(), or a QConfig whose activations are per_tensor_symmetric",
    "pt2e": "prepare_pt2e with cptv_plugin.qconfigs.tensorrt_pt2e_quantizer(bits) (TensorRT's placement), "
            "cptv_plugin.qconfigs.pt2e_quantizer(bits, symmetric_activations=True) (XNNPACK's), or a quantizer "
            "whose activation QuantizationSpec is per_tensor_symmetric",
}


class _Forward(nn.Module):
    """Hides an fx.GraphModule's ``graph`` attribute from the TorchScript exporter, which would misread it."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return _as_output_tensor(self.module(images))  # the logits of a tuple or of Hugging Face's output


def export_onnx(model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor, *, opset: int | None = None,
                check_tensorrt: bool = True, dynamic_batch: bool = True) -> Path:
    """Export a refined (or just calibrated) quantized model as an ONNX file with Q/DQ pairs for TensorRT.

    Args:
        model: a torch.ao FX GraphModule from ``prepare_fx`` / ``prepare_qat_fx`` (refined or calibrated; export
            before ``convert_fx``), a torchao PT2E model from ``prepare_pt2e`` (refined or calibrated; export before
            ``convert_pt2e``; TensorRT needs a quantizer with *symmetric* activations), a ModelOpt model or a
            pytorch-quantization model. It is not modified.
        path: the output file, written atomically (a temporary file renamed into place).
        example_input: a batch of images shaped as the model expects.
        opset: ONNX opset (≥ 13, for per-channel QuantizeLinear). ``None``: 17 through the TorchScript exporter,
            18 for PT2E models (the dynamo exporter's own; it converts to older opsets only where every op has an
            adapter, and a file that does not come out at the opset asked for is refused).
        check_tensorrt: run :func:`check_tensorrt_onnx` and refuse (nothing written) if a rule is broken.
        dynamic_batch: make the batch dimension dynamic.

    Returns:
        The path written.
    """
    if opset is not None and opset < 13:
        raise ExportError(f"opset {opset} is too old: per-channel QuantizeLinear needs opset >= 13")
    path = Path(path)
    framework = detect_framework(model)
    if opset is None:
        opset = 18 if framework == "pt2e" else 17
    with atomic_path(path) as temporary, _export_view(model, framework) as module:
        if framework == "pt2e":
            _export_converted_pt2e(module, temporary, example_input, opset, dynamic_batch)
        else:
            module = _Forward(module).eval()
            # with gradients on: under no_grad, nn.MultiheadAttention (torchvision's ViT) takes its fused fast path,
            # aten::_native_multi_head_attention, which the TorchScript exporter cannot write
            with torch.enable_grad():
                torch.onnx.export(module, (example_input,), str(temporary), opset_version=opset, dynamo=False,
                                  input_names=["images"], output_names=["logits"],
                                  dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch
                                  else None)
        written = _opset_of(temporary)
        if written != opset:  # the dynamo exporter keeps its own opset where it cannot convert an op
            raise ExportError(f"torch's ONNX exporter wrote opset {written}, not the {opset} asked for (it has no "
                              f"conversion for every op of this model): pass opset={written}")
        if check_tensorrt:
            violations = check_tensorrt_onnx(temporary)
            if violations:
                hint = ""
                affine = any(re.search(r"zero point is (not 0|uint8)|no zero point", v) for v in violations)
                if framework in _SYMMETRIC_ACTIVATIONS and affine:
                    hint = ("Activations are affine (a zero point, or uint8): TensorRT needs them symmetric int8. "
                            f"Quantize with {_SYMMETRIC_ACTIVATIONS[framework]}; or pass check_tensorrt=False for an "
                            "ONNX file for other runtimes.")
                raise TensorRTRuleError(violations, hint)
    logger.info("exported %s model to %s", framework, path)
    return path


@contextmanager
def _export_view(model: nn.Module, framework: str):
    """A copy of ``model`` whose fake quantization exports as int8 Q/DQ."""
    if framework == "fx":
        yield _fx_export_module(model)
    elif framework == "pt2e":
        yield _pt2e_converted_copy(model)
    elif framework in ("modelopt", "pytorch-quantization"):
        module = copy.deepcopy(model).eval()
        _widen_low_bit_weights(module, framework)
        if framework == "pytorch-quantization":
            from pytorch_quantization.nn import TensorQuantizer

            previous = TensorQuantizer.use_fb_fake_quant
            TensorQuantizer.use_fb_fake_quant = True  # torch's fake-quantize ops, which export as Q/DQ
            try:
                yield module
            finally:
                TensorQuantizer.use_fb_fake_quant = previous
        else:
            yield module
    else:
        raise ExportError(f"export_onnx does not support {framework} models yet")


def _fx_export_module(prepared: nn.Module) -> nn.Module:
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase

    from .fx.refine import FxSession

    prepared = copy.deepcopy(prepared)
    session = FxSession(prepared, target="convert_fx")
    _refuse_narrowed_activations(session.all_handles)
    session.commit()  # in the copy: clips low-bit weights onto their grid
    _snap_weights_onto_grid(session.eval_module)
    for fq in session.fake_quants:  # QuantizeLinear has no narrower range: export on the int8 range
        if isinstance(fq, FakeQuantizeBase) and fq.quant_min < 0:
            fq.quant_min, fq.quant_max = -128, 127
            fq.activation_post_process.quant_min, fq.activation_post_process.quant_max = -128, 127
    session.set_quantization(True)
    return session.eval_module.eval()


def _snap_weights_onto_grid(module: nn.Module) -> None:
    """Replace each quantized weight of the export copy by its fake-quantized value k·s, as the search computed it.

    torch.ao's symmetric MinMax scale is ``max|w| / ((q_max − q_min) / 2)``, so each channel's largest weight lies
    exactly halfway between two integers (±7.5 at 4 bits, −127.5 at 8), and which way it rounds depends on the
    arithmetic: torch multiplies by 1/s, ONNX's QuantizeLinear (and TensorRT) divide by s. At k·s every rounding
    gives k, so the file holds the integers that were optimized (measured on the Swin-like model, W4A8: weights
    up to one step apart before, top-1 agreement with onnxruntime 98.0 % of 1,000 test images, 99.9 % after)."""
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase

    from .fx.quantizers import SimulatedWeightModule

    with torch.no_grad():
        for weight_module in module.modules():
            if isinstance(weight_module, SimulatedWeightModule) and weight_module.weight_quantizer.enabled:
                weight = weight_module._leader.weight
                weight.copy_(weight_module.weight_quantizer(weight.detach()))
            fake_quant = getattr(weight_module, "weight_fake_quant", None)  # QAT modules (prepare_qat_fx)
            if isinstance(fake_quant, FakeQuantizeBase) and bool(fake_quant.fake_quant_enabled[0]):
                weight, zero_point = weight_module.weight, fake_quant.zero_point.to(torch.int32)
                bounds = (fake_quant.quant_min, fake_quant.quant_max)  # its own arithmetic, without observing
                weight.copy_(torch.fake_quantize_per_channel_affine(weight, fake_quant.scale, zero_point,
                                                                    fake_quant.ch_axis, *bounds)
                             if fake_quant.is_per_channel else
                             torch.fake_quantize_per_tensor_affine(weight, fake_quant.scale, zero_point, *bounds))


def _pt2e_converted_copy(prepared: nn.Module) -> nn.Module:
    """``convert_pt2e`` of a copy: weights become integer constants behind DequantizeLinear (their narrowed values
    fit int8 as they are); low-bit activations are refused, as ONNX's QuantizeLinear only knows the int8 range."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from .fx.refine import FxSession

    prepared = copy.deepcopy(prepared)
    _refuse_narrowed_activations(FxSession(prepared, flavor="pt2e").all_handles)
    return convert_pt2e(prepared)


def _export_converted_pt2e(converted: nn.Module, path: Path, example_input: torch.Tensor, opset: int,
                           dynamic_batch: bool) -> None:
    """torch.export the converted graph again and write it with torch's dynamo ONNX exporter (the TorchScript
    exporter does not know the decomposed quantize ops); they become QuantizeLinear / DequantizeLinear."""
    import importlib.util

    from .refinement import is_fixed_batch_error

    if importlib.util.find_spec("onnxscript") is None:  # the dynamo exporter's dependency
        raise ExportError("exporting a PT2E model needs onnxscript: pip install 'cptv_plugin[onnx]'")
    dynamic_shapes = ({0: torch.export.Dim.DYNAMIC},) if dynamic_batch else None
    example_input = example_input.clone()  # torch.export marks the tensor it traced as dynamic: not the user's
    try:
        program = torch.export.export(converted, (example_input,), dynamic_shapes=dynamic_shapes)
    except Exception as error:  # torch.export's errors have many types; the batch guard is the one we can name
        if dynamic_batch and is_fixed_batch_error(error):
            raise ExportError(
                "the converted PT2E model fixes its batch size, so the ONNX file cannot take any batch: export the "
                "model for prepare_pt2e with dynamic_shapes=({0: torch.export.Dim('batch')},), or pass "
                "dynamic_batch=False") from error
        raise
    with torch.no_grad():
        torch.onnx.export(program, (example_input,), str(path), opset_version=opset, dynamo=True,
                          input_names=["images"], output_names=["logits"], verbose=False,
                          external_data=False)  # one file (its default writes weights beside, named after it)


def _opset_of(model) -> int:
    """The default-domain opset of an ONNX file (a path) or of a loaded ``ModelProto``."""
    if isinstance(model, (str, os.PathLike)):
        import onnx

        model = onnx.load(str(model), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _refuse_narrowed_activations(handles) -> None:
    narrowed = [h for h in handles if h.role == "activation" and h.bits < 8]
    if narrowed:
        raise ExportError(f"{len(narrowed)} activation quantizer(s) use fewer than 8 bits (e.g. {narrowed[0].name}: "
                          f"{narrowed[0].bits} bits): "
                          "TensorRT's int8 Q/DQ cannot express them. Quantize activations with 8 bits to export.")


def refuse_amax_narrowed_activations(model: nn.Module, framework: str) -> None:
    """Raise :class:`ExportError` where a ModelOpt / pytorch-quantization model has activations below 8 bits (the
    export refuses them; ``refine_modelopt_checkpoint(onnx=...)`` checks before it refines)."""
    _refuse_narrowed_activations([handle for handle, _ in _amax_handles(model, framework)])


def _amax_handles(model: nn.Module, framework: str, log: bool = False):
    """The enabled quantizers of a ModelOpt / pytorch-quantization model, as (handle, kind); those of layers that
    never run are left out (and named in a warning where ``log``)."""
    from .amax.session import AmaxHandle, never_reached_quantizers, quantizer_role
    from .frameworks import quantizer_kind

    kind = quantizer_kind(framework)
    quantizers = {path: q for path, q in model.named_modules() if isinstance(q, kind.quantizer_type)}
    never_ran = never_reached_quantizers(quantizers, kind, log=log)  # their layer never runs: nothing to export
    for path, quantizer in quantizers.items():
        if kind.is_enabled(quantizer) and path not in never_ran:
            yield AmaxHandle(path, quantizer, quantizer_role(path), kind), kind


def _widen_low_bit_weights(model: nn.Module, framework: str) -> None:
    """ModelOpt / pytorch-quantization copy: clip each low-bit weight onto its grid, then quantize it as int8
    with the same scale (identical values); refuse low-bit activations."""
    from .fx.handles import clamp_weight_to_grid

    handles = list(_amax_handles(model, framework, log=True))  # a model refined elsewhere hears of them here too
    _refuse_narrowed_activations([handle for handle, _ in handles])
    for handle, kind in handles:
        if handle.bits >= 8:
            continue
        path, quantizer = handle.name, handle.quantizer
        owner = model.get_submodule(path.rpartition(".")[0])
        scale = handle.read().reshape(-1)
        clamp_weight_to_grid(owner.weight, scale, torch.zeros_like(scale), handle.quant_min, handle.quant_max,
                             0 if scale.numel() > 1 else None)  # per-channel amax lies on the output channel
        quantizer.num_bits = 8
        kind.set_amax(quantizer, (scale * 127).to(quantizer.amax.dtype).reshape(quantizer.amax.shape))


# --------------------------------------------------------------------------------------------- the checker


def check_tensorrt_onnx(path: str | os.PathLike) -> list[str]:
    """Every TensorRT explicit-quantization rule the ONNX file at ``path`` breaks (empty: none).

    Rules: opset ≥ 13; at least one Q/DQ pair; int8 zero points equal to 0 (uint8 or missing zero points are
    refused); positive finite scales; each QuantizeLinear feeds only DequantizeLinear nodes with the same scale,
    zero point and axis; per-channel scales only on constant (weight) inputs, on the consumer's output-channel
    axis (Conv: 0, ConvTranspose: 1, Gemm: 0 with transB else 1, MatMul: last); activations per tensor.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    problems: list[str] = []
    opset = _opset_of(model)
    if opset < 13:
        problems.append(f"opset {opset} < 13: per-channel QuantizeLinear needs opset 13 or later")
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    constants[node.output[0]] = numpy_helper.to_array(attribute.t)
    producers = {out: node for node in graph.node for out in node.output}
    for name in list(producers):  # values behind Identity chains of constants are constants too
        source = name
        while source not in constants and source in producers and producers[source].op_type == "Identity":
            source = producers[source].input[0]
        if source in constants:
            constants[name] = constants[source]
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def is_constant(name: str) -> bool:
        """A weight: an initializer or a Constant, possibly behind shape-only ops."""
        seen = name
        while seen not in constants:
            node = producers.get(seen)
            if node is None or node.op_type not in ("Identity", "Transpose", "Reshape", "Unsqueeze", "Squeeze"):
                return False
            seen = node.input[0]
        return True

    def axis_of(node) -> int:
        return next((a.i for a in node.attribute if a.name == "axis"), 1)

    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not any(n.op_type == "QuantizeLinear" for n in graph.node):
        problems.append("no QuantizeLinear node: the graph is not explicitly quantized")
    for node in qdq:
        label = f"{node.op_type} {node.name or node.output[0]}"
        scale = constants.get(node.input[1])
        if scale is None:
            problems.append(f"{label}: scale is not a constant")
            continue
        if not (np.isfinite(scale).all() and (scale > 0).all()):
            problems.append(f"{label}: scale must be positive and finite")
        if len(node.input) < 3 or not node.input[2]:
            problems.append(f"{label}: no zero point (ONNX then means uint8); TensorRT needs int8 with zero point 0")
        else:
            zero_point = constants.get(node.input[2])
            if zero_point is None:
                problems.append(f"{label}: zero point is not a constant")
            elif zero_point.dtype != np.int8:
                problems.append(f"{label}: zero point is {zero_point.dtype}; TensorRT needs int8 (symmetric)")
            elif (zero_point != 0).any():
                problems.append(f"{label}: zero point is not 0; TensorRT needs symmetric quantization")
        per_channel = scale.size > 1
        if node.op_type != "QuantizeLinear":
            if per_channel and node.input[0] in constants:  # a weight stored as integers: DQ only (PT2E's form)
                problems += _check_weight_axis(label, node, axis_of(node), consumers, producers, constants)
            continue
        if per_channel and not is_constant(node.input[0]):
            problems.append(f"{label}: per-channel scale on an activation; TensorRT needs per-tensor activations")
        for user in consumers.get(node.output[0], []):
            if user.op_type != "DequantizeLinear":
                problems.append(f"{label}: feeds {user.op_type} {user.name}; it must feed a DequantizeLinear")
                continue
            same = all(np.array_equal(constants.get(a), constants.get(b)) for a, b in
                       zip(node.input[1:], user.input[1:])) and (not per_channel or axis_of(node) == axis_of(user))
            if not same:
                problems.append(f"{label}: its DequantizeLinear {user.name} uses other scale/zero point/axis")
            if per_channel:
                problems += _check_weight_axis(label, user, axis_of(user), consumers, producers, constants)
    return problems


def _check_weight_axis(label, dequantize, axis, consumers, producers, constants) -> list[str]:
    """Per-channel weight scales must lie on the consuming layer's output-channel axis."""
    name, position_axis = dequantize.output[0], axis
    while True:
        users = consumers.get(name, [])
        if len(users) != 1:
            return []  # shared or dangling weight: nothing to infer
        user = users[0]
        if user.op_type == "Transpose":
            perm = next(list(a.ints) for a in user.attribute if a.name == "perm")
            position_axis = perm.index(position_axis)
            name = user.output[0]
            continue
        if user.op_type in ("Identity", "Reshape", "Unsqueeze", "Squeeze"):
            name = user.output[0]
            continue
        break
    if list(user.input).index(name) != 1:
        return []
    if user.op_type == "Conv":
        expected = 0
    elif user.op_type == "ConvTranspose":
        expected = 1
    elif user.op_type == "Gemm":
        expected = 0 if next((a.i for a in user.attribute if a.name == "transB"), 0) else 1
    elif user.op_type == "MatMul":
        expected = -1
    else:
        return []
    rank = None
    source = dequantize.input[0]
    while source in producers and source not in constants:
        source = producers[source].input[0]
    if source in constants:
        rank = constants[source].ndim
    if expected == -1 and rank is not None:
        expected = rank - 1
    if position_axis != expected:
        return [f"{label}: per-channel axis {axis} is not the output-channel axis of {user.op_type} {user.name}"]
    return []
