"""The lossless check: a quantized model that already matches its full-precision twin is left as it is."""

import copy

import pytest
import torch

import cptv_plugin
from cptv_plugin import SearchConfig
from conftest import prepare_and_calibrate
from test_gradient import amax_of, mean_kl, modelopt_w2a8

# a short search without the stage: enough to see scales move when the check lets it run
SHORT = SearchConfig(passes=1, population=3, cycles=1, samples=2, batch_size=50, progress=False,
                     seed_candidates=(), start_candidates=(), gradient_steps=0)


def test_below_the_threshold_modelopt_scales_are_untouched_and_the_divergence_is_the_models_own(tiny_vit, fmnist):
    calib = fmnist[0]
    given_model = modelopt_w2a8(tiny_vit, calib)
    divergence = mean_kl(given_model, tiny_vit, calib)  # ModelOpt's own forward against the FP model

    model = copy.deepcopy(given_model)
    result = cptv_plugin.refine(model, calib, config=SHORT.replace(lossless_kl=2 * divergence))
    assert result.lossless["skipped"] and result.lossless["kl"] == pytest.approx(divergence, rel=1e-4)
    assert result.evaluations == 0 and result.gradient is None
    assert result.initial_fitness == result.final_fitness
    assert result.seconds > 0  # the check's own pass is what a skipped refinement cost
    assert f"left as given: KL {result.lossless['kl']:.2g} < lossless_kl=" in str(result)
    given, after = amax_of(given_model), amax_of(model)
    assert given.keys() == after.keys() and all(torch.equal(given[name], after[name]) for name in given)

    result = cptv_plugin.refine(model, calib, config=SHORT.replace(lossless_kl=divergence / 2))
    assert not result.lossless["skipped"] and result.evaluations > 0
    after = amax_of(model)
    assert any(not torch.equal(given[name], after[name]) for name in given)


def test_a_skipped_fx_model_converts_exactly_as_the_given_one(tiny_vit, fmnist):
    from torch.ao.quantization.quantize_fx import convert_fx

    calib = fmnist[0]
    given = prepare_and_calibrate(tiny_vit, calib, "W8A8")
    model = copy.deepcopy(given)
    result = cptv_plugin.refine_fx(model, calib, config=SHORT.replace(lossless_kl=1e9))
    assert result.lossless["skipped"] and 0 < result.lossless["kl"] < 1e9
    with torch.no_grad():
        expected = convert_fx(given)(calib[:50])
        assert torch.equal(convert_fx(model)(calib[:50]), expected)


def test_lossless_threshold_is_validated_and_only_the_paper_preset_always_refines():
    with pytest.raises(ValueError, match="lossless_kl must be >= 0"):
        SearchConfig(lossless_kl=-1e-3)
    assert SearchConfig().lossless_kl == 1e-3
    assert SearchConfig.paper().lossless_kl == 0 and SearchConfig.fast().lossless_kl == 1e-3
