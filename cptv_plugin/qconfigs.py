"""Bit-width settings ("W4A8") turned into the frameworks' own quantization configs."""

from __future__ import annotations

import re

import torch

__all__ = ["parse_bits", "fx_qconfig_mapping", "pt2e_quantizer", "tensorrt_pt2e_quantizer", "modelopt_config",
           "prepare_timm_for_fx"]


def parse_bits(bits: str) -> tuple[int, int]:
    """``"W4A8"`` → ``(4, 8)``."""
    match = re.fullmatch(r"[Ww](\d+)[Aa](\d+)", bits.strip())
    if not match:
        raise ValueError(f"bit setting must look like 'W4A8', got {bits!r}")
    weight_bits, activation_bits = int(match.group(1)), int(match.group(2))
    if not (2 <= weight_bits <= 8 and 2 <= activation_bits <= 8):
        raise ValueError(f"bit widths must be between 2 and 8, got {bits!r}")
    return weight_bits, activation_bits


def fx_qconfig_mapping(bits: str = "W8A8", activation_observer=None, qat: bool = False,
                       symmetric_activations: bool = False):
    """A torch.ao ``QConfigMapping`` for the FX flow: MinMax per-channel symmetric weights with ``W`` bits
    (qint8 storage, narrowed range) and per-tensor affine activations with ``A`` bits (quint8 storage).

    Args:
        bits: e.g. ``"W4A8"``.
        activation_observer: observer class for activations (default ``MinMaxObserver``; e.g.
            ``HistogramObserver``).
        qat: wrap both in ``FakeQuantize`` (for ``prepare_qat_fx``).
        symmetric_activations: per-tensor *symmetric* qint8 activations, as TensorRT needs; prepare with
            ``backend_config=torch.ao.quantization.backend_config.get_tensorrt_backend_config()`` (torch.ao's
            native backend only quantizes quint8 activations).
    """
    from torch.ao.quantization import (FakeQuantize, MinMaxObserver, PerChannelMinMaxObserver, QConfig,
                                       QConfigMapping)

    weight_bits, activation_bits = parse_bits(bits)
    weight = PerChannelMinMaxObserver.with_args(
        dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
        quant_min=-(2 ** (weight_bits - 1)), quant_max=2 ** (weight_bits - 1) - 1,
    )
    if symmetric_activations:
        activation = (activation_observer or MinMaxObserver).with_args(
            dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-(2 ** (activation_bits - 1)),
            quant_max=2 ** (activation_bits - 1) - 1,
        )
    else:
        activation = (activation_observer or MinMaxObserver).with_args(
            dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=2**activation_bits - 1,
        )
    if qat:
        weight = FakeQuantize.with_args(observer=weight.p.func, **weight.p.keywords)
        activation = FakeQuantize.with_args(observer=activation.p.func, **activation.p.keywords)
    return QConfigMapping().set_global(QConfig(activation=activation, weight=weight))


def pt2e_quantizer(bits: str = "W8A8", *, symmetric_activations: bool = False, qat: bool = False):
    """torchao's reference PT2E quantizer (``XNNPACKQuantizer``, static config) at ``bits``: per-channel symmetric
    weights with ``W`` bits and per-tensor int8 activations with ``A`` bits (``HistogramObserver``). Pass it to
    ``prepare_pt2e`` (``qat=True``: ``prepare_qat_pt2e``).

    Args:
        bits: e.g. ``"W4A8"``.
        symmetric_activations: activations without zero point, as TensorRT needs (XNNPACK's own are affine);
            :func:`cptv_plugin.export_onnx` refuses affine activations for TensorRT.
        qat: FakeQuantize instead of observers.
    """
    import dataclasses

    from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

    weight_bits, activation_bits = parse_bits(bits)
    config = get_symmetric_quantization_config(
        is_per_channel=True, is_qat=qat,
        act_qmin=-(2 ** (activation_bits - 1)), act_qmax=2 ** (activation_bits - 1) - 1,
        weight_qmin=-(2 ** (weight_bits - 1)), weight_qmax=2 ** (weight_bits - 1) - 1)
    if symmetric_activations:
        activation = dataclasses.replace(config.input_activation, qscheme=torch.per_tensor_symmetric)
        config = dataclasses.replace(config, input_activation=activation, output_activation=activation)
    return XNNPACKQuantizer().set_global(config)


def tensorrt_pt2e_quantizer(bits: str = "W8A8", *, qat: bool = False):
    """A torchao PT2E quantizer with TensorRT's placement and formats, built on torchao's public quantizer API:
    the input and weight of every ``linear`` and ``conv2d`` (ModelOpt's default placement, the one TensorRT's int8
    kernels fuse), activations per tensor and symmetric with ``A`` bits (``MinMaxObserver``), weights per output
    channel and symmetric on ``[-(2^(W-1) - 1), 2^(W-1) - 1]`` (TensorRT's weight range; the scale is
    ``max|w| / (2^(W-1) - 1)``, as ModelOpt's ``amax`` gives it), biases in float. Pass it to ``prepare_pt2e``
    (``qat=True``: FakeQuantize with moving-average observers, for ``prepare_qat_pt2e``); the refined model exports
    with :func:`cptv_plugin.export_onnx` at 8-bit activations.

    Unlike :func:`pt2e_quantizer` it needs no quantizer from ``torchao.testing`` (XNNPACK's, deprecated there) and
    quantizes no other op (XNNPACK's also quantizes adds, pooling and more, affine unless asked otherwise).
    """
    from torchao.quantization.pt2e import (FakeQuantize, MinMaxObserver, MovingAverageMinMaxObserver,
                                           MovingAveragePerChannelMinMaxObserver, PerChannelMinMaxObserver)
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer

    weight_bits, activation_bits = parse_bits(bits)
    activation_observer = MovingAverageMinMaxObserver if qat else MinMaxObserver
    weight_observer = MovingAveragePerChannelMinMaxObserver if qat else PerChannelMinMaxObserver
    if qat:
        activation_observer = FakeQuantize.with_args(observer=activation_observer)
        weight_observer = FakeQuantize.with_args(observer=weight_observer)
    activation = QuantizationSpec(
        dtype=torch.int8, quant_min=-(2 ** (activation_bits - 1)), quant_max=2 ** (activation_bits - 1) - 1,
        qscheme=torch.per_tensor_symmetric, is_dynamic=False, observer_or_fake_quant_ctr=activation_observer)
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=-(2 ** (weight_bits - 1) - 1), quant_max=2 ** (weight_bits - 1) - 1,
        qscheme=torch.per_channel_symmetric, ch_axis=0, is_dynamic=False, observer_or_fake_quant_ctr=weight_observer)
    quantized_ops = (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default)

    class TensorRTQuantizer(Quantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            for node in model.graph.nodes:
                if node.op == "call_function" and node.target in quantized_ops and \
                        "quantization_annotation" not in node.meta:
                    node.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={node.args[0]: activation, node.args[1]: weight}, _annotated=True)
            return model

        def validate(self, model: torch.fx.GraphModule) -> None:
            pass

    return TensorRTQuantizer()


def modelopt_config(bits: str = "W8A8", algorithm: str = "max") -> dict:
    """ModelOpt's ``INT8_DEFAULT_CFG`` (per-channel weights on the output channel, per-tensor inputs of every
    Linear/Conv: ModelOpt's default placement) at ``bits``, with amax calibration ``algorithm`` (``"max"``,
    ``"mse"``, ``"local_hessian"``, ...). Pass it to ``mtq.quantize``."""
    import copy

    import modelopt.torch.quantization as mtq

    weight_bits, activation_bits = parse_bits(bits)
    config = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    for entry in config["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer":
            entry["cfg"]["num_bits"] = weight_bits
        elif entry.get("quantizer_name") == "*input_quantizer":
            entry["cfg"]["num_bits"] = activation_bits
    config["algorithm"] = {"method": algorithm}
    return config


def prepare_timm_for_fx(model: torch.nn.Module) -> torch.nn.Module:
    """Switch timm attention from the fused kernel to explicit matmul + softmax, so that FX tracing sees
    (and quantizes) the attention map. Returns the same model; call it on your model before prepare_fx."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model
