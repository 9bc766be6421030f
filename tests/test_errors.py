"""Bad input gets a clear error that names the problem, and the user's model is left unchanged."""

import copy

import pytest
import torch
from torch.ao.quantization import QConfigMapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import cptv_plugin
from cptv_plugin import CalibrationError, NoQuantizersError, NotPreparedError, UnsupportedModelError
from conftest import TINY_SEARCH, prepare_and_calibrate


def state_of(prepared):
    """Everything refine_fx could touch: buffers, parameters, module types and qconfigs."""
    tensors = {k: v.clone() for k, v in prepared.state_dict().items()}
    kinds = {n: type(m).__name__ for n, m in prepared.named_modules()}
    qconfigs = {n: getattr(m, "qconfig", None) for n, m in prepared.named_modules()}
    return tensors, kinds, qconfigs


def assert_unchanged(prepared, before):
    tensors, kinds, qconfigs = state_of(prepared)
    assert kinds == before[1] and qconfigs == before[2]
    assert tensors.keys() == before[0].keys()
    for key in tensors:
        assert torch.equal(tensors[key], before[0][key]), key


@pytest.fixture
def prepared(tiny_vit, fmnist):
    return prepare_and_calibrate(tiny_vit, fmnist[0][:100], "W4A8")


def test_unprepared_model_is_refused(tiny_vit, fmnist):
    with pytest.raises(NotPreparedError, match="prepare_fx"):
        cptv_plugin.refine_fx(tiny_vit, fmnist[0], config=TINY_SEARCH)


def test_model_without_quantizers_is_refused(tiny_vit, fmnist):
    prepared = prepare_fx(copy.deepcopy(tiny_vit), QConfigMapping(), example_inputs=(fmnist[0][:1],))
    with pytest.raises(NoQuantizersError, match="no quantizer"):
        cptv_plugin.refine_fx(prepared, fmnist[0], config=TINY_SEARCH)


@pytest.mark.parametrize("data, message", [
    (torch.empty(0, 1, 28, 28), "empty"),
    ([], "empty"),
    (torch.randn(1, 1, 28, 28), "at least 2"),
    (torch.randn(8, 3, 28, 28), "shape"),
    (torch.full((8, 1, 28, 28), float("nan")), "NaN"),
    (torch.zeros(8, 1, 28, 28, dtype=torch.uint8), "floating point"),
    ("images/", "tensor"),
])
def test_bad_calibration_data_is_refused_and_model_untouched(prepared, data, message):
    before = state_of(prepared)
    with pytest.raises(CalibrationError, match=message):
        cptv_plugin.refine_fx(prepared, data, config=TINY_SEARCH)
    assert_unchanged(prepared, before)


def test_uncalibrated_observer_is_refused(tiny_vit, fmnist):
    from cptv_plugin.qconfigs import fx_qconfig_mapping

    prepared = prepare_fx(copy.deepcopy(tiny_vit), fx_qconfig_mapping("W4A8"), example_inputs=(fmnist[0][:1],))
    before = state_of(prepared)
    # the class ModelOpt and pytorch-quantization models raise too: one except clause for every framework
    with pytest.raises(cptv_plugin.NotCalibratedError, match="never calibrated.*prepared\\(images\\)"):
        cptv_plugin.refine_fx(prepared, fmnist[0][:10], config=TINY_SEARCH)
    assert_unchanged(prepared, before)


def test_failure_during_search_restores_the_model(prepared, fmnist, monkeypatch):
    import cptv_plugin.refinement as refine

    before = state_of(prepared)
    baseline = convert_fx(copy.deepcopy(prepared))(fmnist[1][:20])

    def broken_search(groups, evaluator, config, fingerprint="", starts=None, given_agreement=None, pass_judge=None):
        for group in groups:  # move scales, then fail half way
            group.set(group.read() * 2)
        raise RuntimeError("boom")

    monkeypatch.setattr(refine, "evolutionary_search", broken_search)
    with pytest.raises(RuntimeError, match="boom"):
        cptv_plugin.refine_fx(prepared, fmnist[0][:20], config=TINY_SEARCH.replace(batch_size=20))
    assert_unchanged(prepared, before)
    torch.testing.assert_close(convert_fx(copy.deepcopy(prepared))(fmnist[1][:20]), baseline, rtol=0, atol=0)


def test_model_outputs_are_read_as_logits_or_refused_with_the_fix():
    """The fitness takes a tensor, the first of a tuple, or the ``logits`` of a mapping (Hugging Face's outputs);
    anything else is refused with what to do."""
    from cptv_plugin import ModelOutputError
    from cptv_plugin.engine import _as_output_tensor

    logits = torch.randn(4, 10)
    assert _as_output_tensor(logits) is logits
    assert _as_output_tensor((logits, torch.zeros(1))) is logits
    assert _as_output_tensor({"loss": None, "logits": logits}) is logits
    for output in ({"scores": logits}, "logits", [None]):
        with pytest.raises(ModelOutputError, match="wrap the model so that it returns its logits"):
            _as_output_tensor(output)


def test_nan_model_output_is_reported(prepared, fmnist):
    from cptv_plugin import ModelOutputError

    with torch.no_grad():
        prepared.cls_token.fill_(float("nan"))
    with pytest.raises(ModelOutputError, match="NaN"):
        cptv_plugin.refine_fx(prepared, fmnist[0][:20], config=TINY_SEARCH.replace(batch_size=20))


def test_unknown_architecture_names_the_fix(fmnist):
    from cptv_plugin.qconfigs import fx_qconfig_mapping

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(28 * 28, 32), torch.nn.Linear(32, 10)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x.flatten(1))))

    prepared = prepare_fx(Plain().eval(), fx_qconfig_mapping("W4A8"), example_inputs=(fmnist[0][:1],))
    with torch.no_grad():
        prepared(fmnist[0][:50])
    with pytest.raises(UnsupportedModelError, match="register_block_adapter"):
        cptv_plugin.refine_fx(prepared, fmnist[0][:50], config=TINY_SEARCH)
    # explicit block paths are the documented way around it
    result = cptv_plugin.refine_fx(prepared, fmnist[0][:50], blocks=["fc1", "fc2"], config=TINY_SEARCH)
    assert result.final_fitness <= result.initial_fitness


def test_device_mismatch_is_refused(prepared, fmnist):
    with pytest.raises(ValueError, match="config.device"):
        cptv_plugin.refine_fx(prepared, fmnist[0][:20], config=TINY_SEARCH.replace(device="meta"))
