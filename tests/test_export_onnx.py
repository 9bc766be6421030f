"""TensorRT explicit-quantization ONNX export: rules, onnxruntime agreement, scales equal to the refined ones."""

import copy

import numpy as np
import pytest
import torch

import cptv_plugin
from cptv_plugin import ExportError, TensorRTRuleError, check_tensorrt_onnx, export_onnx
from cptv_plugin.qconfigs import fx_qconfig_mapping
from conftest import TINY_SEARCH, modelopt_quantize, onnxruntime_logits, prepare_and_calibrate

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def fx_tensorrt(model, calib, bits):
    from torch.ao.quantization.backend_config import get_tensorrt_backend_config
    from torch.ao.quantization.quantize_fx import prepare_fx

    prepared = prepare_fx(copy.deepcopy(model).eval(), fx_qconfig_mapping(bits, symmetric_activations=True),
                          example_inputs=(calib[:1],), backend_config=get_tensorrt_backend_config())
    with torch.no_grad():
        prepared(calib)
    return prepared


def pt2e_tensorrt(model, calib, bits, symmetric_activations=True, quantizer=None):
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from cptv_plugin.qconfigs import pt2e_quantizer

    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(copy.deepcopy(model).eval(), (calib[:2],), dynamic_shapes=({0: batch},)).module()
    quantizer = quantizer or pt2e_quantizer(bits, symmetric_activations=symmetric_activations)
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        prepared(calib)
    return prepared


def build(framework, tiny_vit, calib, bits):
    if framework.startswith("pt2e"):
        pytest.importorskip("torchao")
        pytest.importorskip("onnxscript")
        from cptv_plugin.qconfigs import tensorrt_pt2e_quantizer

        quantizer = tensorrt_pt2e_quantizer(bits) if framework == "pt2e-tensorrt" else None
        return pt2e_tensorrt(tiny_vit, calib, bits, quantizer=quantizer)
    if framework == "modelopt":
        return modelopt_quantize(tiny_vit, calib, (int(bits[1]), 8))
    if framework == "pytorch-quantization":
        pytest.importorskip("pytorch_quantization")
        return cptv_plugin.quantize_pytorch_quantization(copy.deepcopy(tiny_vit), bits, calib)
    return fx_tensorrt(tiny_vit, calib, bits)


def onnx_scales(path) -> list[np.ndarray]:
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    # DequantizeLinear too: PT2E stores weights as integers read by a DequantizeLinear alone
    return [values[n.input[1]].reshape(-1) for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


# (framework, bits): top-1 agreement and max |logit| difference measured on 1,000 Fashion-MNIST test images
CASES = [("modelopt", "W8A8"), ("modelopt", "W4A8"), ("pytorch-quantization", "W4A8"), ("fx", "W8A8"),
         ("pt2e", "W4A8"), ("pt2e-tensorrt", "W4A8")]


@pytest.mark.parametrize("framework,bits", CASES)
def test_refined_model_exports_for_tensorrt_and_onnxruntime_agrees(framework, bits, tiny_vit, fmnist, tmp_path):
    refine_export_and_compare(framework, bits, tiny_vit, fmnist, tmp_path, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (CI has none): on the device, "
                    "python3 -m pytest -q tests/test_export_onnx.py -k cuda")
@pytest.mark.parametrize("framework,bits", [("modelopt", "W4A8"), ("fx", "W8A8")])
def test_model_refined_on_cuda_exports_from_cuda(framework, bits, tiny_vit, fmnist, tmp_path):
    """A model refined where it lives (a GPU) exports from there: a CUDA model and a CUDA example batch."""
    refine_export_and_compare(framework, bits, tiny_vit, fmnist, tmp_path, "cuda")


def refine_export_and_compare(framework, bits, tiny_vit, fmnist, tmp_path, device):
    """Quantize on the CPU, refine and export on ``device``; the file holds TensorRT's rules and the refined scales,
    and onnxruntime (on the CPU) computes what the framework's own converted model computes."""
    calib, test_images, _ = fmnist
    test_images = torch.cat([test_images, calib])[:700]
    model = build(framework, tiny_vit, calib[:100], bits).to(device)
    result = cptv_plugin.refine(model, calib[:100].to(device), config=TINY_SEARCH)
    assert result.final_fitness < result.initial_fitness
    path = export_onnx(model, tmp_path / "model.onnx", calib[:2].to(device))
    onnx.checker.check_model(str(path))
    assert check_tensorrt_onnx(path) == []

    logits = onnxruntime_logits(path, test_images)
    with torch.no_grad():
        if framework == "fx":  # what convert_fx computes: the refined scales, simulated
            from cptv_plugin.fx.refine import FxSession

            session = FxSession(copy.deepcopy(model))
            expected = session.eval_module(test_images.to(device)).cpu().numpy()
        elif framework.startswith("pt2e"):  # what convert_pt2e computes
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

            expected = convert_pt2e(copy.deepcopy(model))(test_images.to(device)).cpu().numpy()
        else:
            expected = model.eval()(test_images.to(device)).cpu().numpy()
    agreement = (logits.argmax(1) == expected.argmax(1)).mean()
    # ONNX QuantizeLinear divides by the scale, torch multiplies by its reciprocal: rare ±1 steps compound
    assert agreement >= 0.99, agreement
    assert np.abs(logits - expected).max() < 0.6

    # the scales in the file are the refined ones
    file_scales = onnx_scales(path)
    if framework == "fx":
        refined = [h.read().reshape(-1).cpu().numpy() for h in session.all_handles]
    elif framework.startswith("pt2e"):
        refined = [m.scale.reshape(-1).cpu().numpy() for m in model.modules()
                   if type(m).__name__ == "RefinedPT2EObserver"]
        assert refined
    else:
        refined = [(q.amax.detach().float() / (2 ** (q.num_bits - 1) - 1)).reshape(-1).cpu().numpy()
                   for n, q in model.named_modules() if type(q).__name__ == "TensorQuantizer" and
                   (q.is_enabled if framework == "modelopt" else not q._disabled)]
    for scale in refined:
        assert any(s.shape == scale.shape and np.allclose(s, scale, rtol=1e-6, atol=0) for s in file_scales)


def test_export_leaves_the_user_model_untouched(tiny_vit, fmnist, tmp_path):
    model = build("modelopt", tiny_vit, fmnist[0][:100], "W4A8")
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    export_onnx(model, tmp_path / "m.onnx", fmnist[0][:2])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items() if k in state)
    assert model.blocks[0].mlp.fc1.weight_quantizer.num_bits == 4


def test_affine_uint8_activations_break_the_rules_and_nothing_is_written(tiny_vit, fmnist, tmp_path):
    prepared = prepare_and_calibrate(tiny_vit, fmnist[0][:100], "W8A8")  # torch.ao default: quint8, affine
    target = tmp_path / "affine.onnx"
    hint = r"(?s)zero point.*fx_qconfig_mapping\(bits, symmetric_activations=True\)"  # the rule error names the fix
    with pytest.raises(TensorRTRuleError, match=hint) as error:
        export_onnx(prepared, target, fmnist[0][:2])
    assert any("uint8" in v for v in error.value.violations)
    assert not target.exists() and not list(tmp_path.iterdir())
    # without the check the file is written, and the checker lists the same problems
    export_onnx(prepared, target, fmnist[0][:2], check_tensorrt=False)
    assert check_tensorrt_onnx(target) == error.value.violations


def test_low_bit_activations_are_refused(tiny_vit, fmnist, tmp_path):
    model = modelopt_quantize(tiny_vit, fmnist[0][:100], (8, 4))
    with pytest.raises(ExportError, match="4 bits"):
        export_onnx(model, tmp_path / "a4.onnx", fmnist[0][:2])


def test_checker_finds_per_channel_activations_and_missing_dequantize(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    scale = numpy_helper.from_array(np.array([0.1, 0.2, 0.3], dtype=np.float32), "scale")
    zero = numpy_helper.from_array(np.zeros(3, dtype=np.int8), "zero")
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], axis=1, name="q_act"),
             helper.make_node("Cast", ["q"], ["y"], to=TensorProto.FLOAT, name="cast")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [scale, zero])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)]), str(path))
    problems = check_tensorrt_onnx(path)
    assert any("opset 12" in p for p in problems)
    assert any("per-channel scale on an activation" in p for p in problems)
    assert any("must feed a DequantizeLinear" in p for p in problems)


def test_fx_qat_fake_quantize_model_exports_for_tensorrt(tiny_vit, fmnist, tmp_path):
    """prepare_qat_fx with TensorRT's backend config (symmetric int8 activations), refined."""
    from torch.ao.quantization.backend_config import get_tensorrt_backend_config
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    calib = fmnist[0][:100]
    prepared = prepare_qat_fx(copy.deepcopy(tiny_vit).train(),
                              fx_qconfig_mapping("W8A8", qat=True, symmetric_activations=True),
                              example_inputs=(calib[:1],), backend_config=get_tensorrt_backend_config()).eval()
    with torch.no_grad():
        prepared(calib)
    result = cptv_plugin.refine_fx(prepared, calib, config=TINY_SEARCH)
    assert result.final_fitness < result.initial_fitness
    path = export_onnx(prepared, tmp_path / "qat.onnx", calib[:2])
    assert check_tensorrt_onnx(path) == []
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    weights = [(constants[n.input[0]], constants[n.input[1]]) for n in graph.node
               if n.op_type == "QuantizeLinear" and n.input[0] in constants and constants[n.input[1]].size > 1]
    assert weights
    for weight, scale in weights:  # on the grid (k·s): no halfway value for a runtime to round its own way
        steps = weight / scale.reshape([-1] + [1] * (weight.ndim - 1))
        assert np.abs(steps - np.round(steps)).max() < 1e-3
    logits = onnxruntime_logits(path, fmnist[1])
    with torch.no_grad():
        expected = prepared(fmnist[1]).numpy()  # the QAT model's own fake-quant forward
    assert (logits.argmax(1) == expected.argmax(1)).mean() >= 0.99


def test_pt2e_export_names_what_tensorrt_cannot_run(tiny_vit, fmnist, tmp_path):
    """XNNPACK's own activations are affine: the rule error says how to quantize them symmetrically. Low-bit
    activations are refused; per-channel weights stored as integers get the output-channel axis check."""
    pytest.importorskip("torchao")
    pytest.importorskip("onnxscript")
    calib = fmnist[0][:50]
    affine = pt2e_tensorrt(tiny_vit, calib, "W8A8", symmetric_activations=False)
    target = tmp_path / "affine.onnx"
    with pytest.raises(TensorRTRuleError, match=r"pt2e_quantizer\(bits, symmetric_activations=True\)") as error:
        export_onnx(affine, target, calib[:2])
    assert any("zero point is not 0" in v for v in error.value.violations)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ExportError, match="4 bits|fewer than 8 bits"):
        export_onnx(pt2e_tensorrt(tiny_vit, calib, "W8A4"), tmp_path / "a4.onnx", calib[:2])

    path = export_onnx(pt2e_tensorrt(tiny_vit, calib, "W8A8"), tmp_path / "w8a8.onnx", calib[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w8a8.onnx"]  # one self-contained file
    model = onnx.load(str(path))
    assert [o.version for o in model.opset_import if o.domain == ""] == [18]  # the dynamo exporter's own
    weights = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2}
    assert weights  # int8 weight constants behind DequantizeLinear, no QuantizeLinear in front
    dequantize = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights)
    for attribute in dequantize.attribute:
        if attribute.name == "axis":
            attribute.i = 1  # the input-channel axis of the Linear weight: TensorRT cannot run it
    onnx.save(model, str(tmp_path / "axis.onnx"))
    assert any("not the output-channel axis" in p for p in check_tensorrt_onnx(tmp_path / "axis.onnx"))


def test_pt2e_model_with_a_fixed_batch_is_refused_with_the_fix(tiny_vit, fmnist, tmp_path):
    pytest.importorskip("torchao")
    pytest.importorskip("onnxscript")
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from cptv_plugin.qconfigs import pt2e_quantizer

    calib = fmnist[0][:2]
    exported = torch.export.export(copy.deepcopy(tiny_vit).eval(), (calib,)).module()  # batch 2, fixed
    prepared = prepare_pt2e(exported, pt2e_quantizer("W8A8", symmetric_activations=True))
    with torch.no_grad():
        prepared(calib)
    with pytest.raises(ExportError, match=r"dynamic_shapes=.*or pass dynamic_batch=False"):
        export_onnx(prepared, tmp_path / "fixed.onnx", calib)
    assert not list(tmp_path.iterdir())
    path = export_onnx(prepared, tmp_path / "fixed.onnx", calib, dynamic_batch=False)
    assert check_tensorrt_onnx(path) == []


def test_a_file_at_another_opset_than_asked_is_refused(tiny_vit, fmnist, tmp_path, monkeypatch):
    """torch's dynamo exporter keeps opset 18 where it has no adapter for an op (Swin's Pad, LeViT's axes: measured)
    and says so only in a log line; export_onnx refuses such a file and names the opset it got."""
    pytest.importorskip("torchao")
    pytest.importorskip("onnxscript")
    import cptv_plugin.export as export_module

    calib = fmnist[0][:20]
    prepared = pt2e_tensorrt(tiny_vit, calib, "W8A8")
    assert [o.version for o in onnx.load(str(export_onnx(prepared, tmp_path / "17.onnx", calib[:2], opset=17)))
            .opset_import if o.domain == ""] == [17]  # this model converts
    real = export_module._export_converted_pt2e
    monkeypatch.setattr(export_module, "_export_converted_pt2e",
                        lambda module, path, example, opset, dynamic: real(module, path, example, 18, dynamic))
    with pytest.raises(ExportError, match="wrote opset 18, not the 17 asked for.*pass opset=18"):
        export_onnx(prepared, tmp_path / "other.onnx", calib[:2], opset=17)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["17.onnx"]


def test_fx_weights_in_the_file_are_the_optimized_integers(tiny_vit, fmnist, tmp_path):
    """torch.ao's MinMax scale puts each channel's largest weight halfway between two integers; ONNX divides by the
    scale where torch multiplies by its reciprocal, so the file stores weights on the grid (k·s): every runtime
    then reads the integers the search optimized."""
    from onnx import numpy_helper

    from cptv_plugin.fx.quantizers import SimulatedWeightModule
    from cptv_plugin.fx.refine import FxSession

    calib = fmnist[0][:100]
    prepared = fx_tensorrt(tiny_vit, calib, "W4A8")
    cptv_plugin.refine_fx(prepared, calib, config=TINY_SEARCH)
    graph = onnx.load(str(export_onnx(prepared, tmp_path / "w.onnx", calib[:2]))).graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    simulated = {}
    with torch.no_grad():
        for path, module in FxSession(copy.deepcopy(prepared)).eval_module.named_modules():
            if isinstance(module, SimulatedWeightModule):
                quantizer = module.weight_quantizer
                scale = quantizer.scale.reshape([-1] + [1] * (module._leader.weight.dim() - 1))
                simulated[f"module.{path}.module.weight"] = (quantizer(module._leader.weight) / scale).round().numpy()
    checked = 0
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in simulated:
            continue
        scale = weights[node.input[1]].reshape([-1] + [1] * (weights[node.input[0]].ndim - 1))
        in_file = weights[node.input[0]] / scale  # what QuantizeLinear rounds
        assert np.abs(in_file - np.round(in_file)).max() < 1e-3, node.name  # on the grid: no tie left to round
        assert np.array_equal(np.round(in_file), simulated[node.input[0]]), node.name
        checked += 1
    assert checked == len(simulated) > 0
