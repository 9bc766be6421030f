"""torchao PT2E: refine_pt2e between calibration and convert_pt2e, for the quantizers people use."""

import copy

import pytest
import torch

import cptv_plugin
from cptv_plugin import NotPreparedError
from cptv_plugin.fx.refine import FxSession
from cptv_plugin.models import load_reference_model
from cptv_plugin.qconfigs import pt2e_quantizer, tensorrt_pt2e_quantizer
from conftest import TINY_SEARCH, assert_suffix_matches_full

pytest.importorskip("torchao")
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e  # noqa: E402
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (  # noqa: E402
    X86InductorQuantizer, get_default_x86_inductor_quantization_config)


def export(model, images):
    batch = torch.export.Dim("batch", min=1, max=1024)
    return torch.export.export(model.eval(), (images[:2],), dynamic_shapes=({0: batch},)).module()


def xnnpack(weight_bits=4, qat=False):
    return pt2e_quantizer(f"W{weight_bits}A8", qat=qat)


def prepared_model(name, calib, quantizer, qat=False):
    exported = export(load_reference_model(name), calib)
    prepared = (prepare_qat_pt2e if qat else prepare_pt2e)(exported, quantizer)
    with torch.no_grad():
        prepared(calib)
    return prepared


def converted_scales(converted) -> list[torch.Tensor]:
    """Scale arguments of every quantize/dequantize node convert_pt2e wrote (floats, or per-channel buffers;
    weights are quantized at convert time, so only their dequantize node remains)."""
    scales = []
    for node in converted.graph.nodes:
        if node.op == "call_function" and "quantize_per" in str(node.target):
            scale = node.args[1]
            if isinstance(scale, torch.fx.Node):
                scale = getattr(converted, scale.target)
            scales.append(torch.as_tensor(scale, dtype=torch.float64).reshape(-1))
    return scales


def refined_scales(prepared) -> list[torch.Tensor]:
    return [m.scale.double().reshape(-1) for m in prepared.modules() if type(m).__name__ == "RefinedPT2EObserver"]


def test_simulation_equals_convert_pt2e(fmnist):
    prepared = prepared_model("fmnist_vit_tiny", fmnist[0][:100], xnnpack(4))
    session = FxSession(prepared, flavor="pt2e")
    with torch.no_grad():
        simulated = session.chain.forward(fmnist[1][:50])[0]
        converted = convert_pt2e(copy.deepcopy(prepared))(fmnist[1][:50])
    torch.testing.assert_close(simulated, converted, rtol=0, atol=1e-5)


@pytest.mark.parametrize("quantizer", ["xnnpack-w4", "x86-inductor"])
def test_refine_pt2e_carries_refined_scales_into_convert_pt2e_bit_for_bit(quantizer, fmnist):
    calib = fmnist[0][:100]
    q = xnnpack(4) if quantizer == "xnnpack-w4" else X86InductorQuantizer().set_global(
        get_default_x86_inductor_quantization_config())
    prepared = prepared_model("fmnist_vit_tiny", calib, q)
    baseline = convert_pt2e(copy.deepcopy(prepared))
    assert cptv_plugin.detect_framework(prepared) == "pt2e"
    result = cptv_plugin.refine(prepared, calib, config=TINY_SEARCH)
    assert result.final_fitness < result.initial_fitness
    written = refined_scales(prepared)
    assert written
    converted = convert_pt2e(prepared)
    in_graph = converted_scales(converted)
    # every scale refine wrote is a quantize node's scale in the converted model, exactly
    for scale in written:
        assert any(s.shape == scale.shape and torch.equal(s, scale) for s in in_graph)
    with torch.no_grad():
        assert not torch.equal(converted(fmnist[1][:20]), baseline(fmnist[1][:20]))


def test_qat_prepared_models_are_refined(fmnist):
    calib = fmnist[0][:100]
    exported = export(load_reference_model("fmnist_vit_tiny").train(), calib)
    prepared = prepare_qat_pt2e(exported, xnnpack(4, qat=True))
    with torch.no_grad():
        prepared(calib)
    from torchao.quantization.pt2e import move_exported_model_to_eval

    move_exported_model_to_eval(prepared)
    result = cptv_plugin.refine_pt2e(prepared, calib, config=TINY_SEARCH)
    assert result.final_fitness < result.initial_fitness
    converted = convert_pt2e(prepared)
    fake_quant_scales = [h.double().reshape(-1) for h in refined_scales(prepared)]
    assert fake_quant_scales
    in_graph = converted_scales(converted)
    assert all(any(s.shape == f.shape and torch.equal(s, f) for s in in_graph) for f in fake_quant_scales)


@pytest.mark.parametrize("name,adapter", [("fmnist_swin_tiny", "swin"), ("fmnist_levit", "levit")])
def test_other_families_through_the_same_adapters(name, adapter, fmnist):
    calib = fmnist[0][:100]
    prepared = prepared_model(name, calib, xnnpack(4))
    session = FxSession(prepared, flavor="pt2e")
    assert session.adapter == adapter and len(session.chain.segments) == len(session.groups)
    images = fmnist[0][:8]
    assert_suffix_matches_full(session.chain, session.groups, images)
    result = cptv_plugin.refine_pt2e(prepared, calib, config=TINY_SEARCH)
    assert result.final_fitness < result.initial_fitness


def test_exported_but_not_prepared_or_not_calibrated_is_refused_untouched(fmnist):
    calib = fmnist[0][:50]
    exported = export(load_reference_model("fmnist_vit_tiny"), calib)
    with pytest.raises(NotPreparedError, match="exported but not prepared"):
        cptv_plugin.refine_pt2e(exported, calib)
    prepared = prepare_pt2e(exported, xnnpack(8))
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    kinds = {n: type(m) for n, m in prepared.named_modules()}
    with pytest.raises(cptv_plugin.NotCalibratedError, match="never calibrated"):
        cptv_plugin.refine_pt2e(prepared, calib, config=TINY_SEARCH)
    assert {n: type(m) for n, m in prepared.named_modules()} == kinds
    assert all(torch.equal(before[k], v) for k, v in prepared.state_dict().items())


@pytest.mark.parametrize("fixed_batch", [1, 2])
def test_a_fixed_batch_export_or_a_call_to_refine_fx_names_the_fix_untouched(fixed_batch, fmnist):
    from cptv_plugin import CalibrationError

    calib = fmnist[0][:100]
    model = load_reference_model("fmnist_vit_tiny").eval()
    prepared = prepare_pt2e(torch.export.export(model, (calib[:fixed_batch],)).module(), xnnpack(8))
    with torch.no_grad():
        prepared(calib[:fixed_batch])
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    with pytest.raises(CalibrationError, match=f"exported for a fixed batch size .*== {fixed_batch}.*dynamic_shapes"):
        cptv_plugin.refine_pt2e(prepared, calib, config=TINY_SEARCH)
    with pytest.raises(NotPreparedError, match="comes from torchao's prepare_pt2e: call cptv_plugin.refine_pt2e"):
        cptv_plugin.refine_fx(prepared, calib, config=TINY_SEARCH)
    assert all(torch.equal(before[k], v) for k, v in prepared.state_dict().items())


def test_missing_torchao_says_what_to_install(monkeypatch, fmnist):
    import cptv_plugin.pt2e as pt2e

    monkeypatch.setattr(pt2e, "_torchao_quantizer_types", lambda: ())
    with pytest.raises(ImportError, match=r"cptv_plugin\[pt2e\]"):
        cptv_plugin.refine_pt2e(torch.nn.Linear(2, 2), fmnist[0][:4])


@pytest.mark.parametrize("qat", [False, True])
def test_tensorrt_quantizer_quantizes_the_inputs_and_weights_of_linear_and_conv_only(fmnist, qat):
    """TensorRT's placement (ModelOpt's default): one symmetric per-tensor quantizer on each linear / conv input and a
    per-channel one on its weight, on TensorRT's weight range ±(2^(W-1) - 1); no other op is quantized."""
    prepared = prepared_model("fmnist_vit_tiny", fmnist[0][:100], tensorrt_pt2e_quantizer("W4A8", qat=qat), qat=qat)
    layers = [n for n in prepared.graph.nodes if n.op == "call_function" and
              n.target in (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default)]
    quantizers = {n: prepared.get_submodule(n.target) for n in prepared.graph.nodes if n.op == "call_module" and
                  "activation_post_process" in n.target}
    assert layers and len(quantizers) == 2 * len(layers)
    for node, quantizer in quantizers.items():
        assert {user.target for user in node.users} <= {torch.ops.aten.linear.default, torch.ops.aten.conv2d.default}
        is_weight = node.args[0].op == "get_attr"
        assert quantizer.qscheme == (torch.per_channel_symmetric if is_weight else torch.per_tensor_symmetric)
        assert (quantizer.quant_min, quantizer.quant_max) == ((-7, 7) if is_weight else (-128, 127))
    assert any(type(q).__name__ == "FakeQuantize" for q in quantizers.values()) == qat
