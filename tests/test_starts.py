"""Seed candidates: MSE-clipped weight scales, for every framework, and how the search uses them."""

import copy

import pytest
import torch

import cptv_plugin
from cptv_plugin import SearchConfig
from cptv_plugin.fx.refine import FxSession
from cptv_plugin.starts import seed_vectors, weight_mse_scale
from conftest import prepare_and_calibrate

ONE_VISIT_SEEDED = SearchConfig(passes=1, population=2, cycles=0, samples=1, batch_size=50, progress=False,
                                search_outside_blocks=False, seed_candidates=("weight_mse",))


def quantization_error(handle, scale):
    shape = [1] * handle.weight.dim()
    if handle.axis is not None:
        shape[handle.axis] = -1
    s = scale.float().reshape(shape if handle.axis is not None else [])
    z = handle.zero_points().float().reshape(shape if handle.axis is not None else [])
    w = handle.weight.detach().float()
    q = (torch.clamp(torch.round(w / s) + z, handle.quant_min, handle.quant_max) - z) * s
    return float((q - w).pow(2).sum())


def weight_handles(handles):
    return [h for h in handles if h.role == "weight" and h.weight is not None]


def assert_seed_lowers_every_weight_error(handles):
    assert handles, "no weight handle shows its weight"
    lowered = 0
    for handle in handles:
        seeded = weight_mse_scale(handle)
        assert seeded.shape == handle.read().shape
        before, after = quantization_error(handle, handle.read()), quantization_error(handle, seeded)
        assert after <= before * (1 + 1e-6), handle.name
        lowered += after < before * 0.9
    assert lowered >= len(handles) // 2  # at 2 bits MinMax is far from the MSE-optimal clipping


def test_weight_mse_seed_for_fx_weights(tiny_vit, fmnist):
    prepared = prepare_and_calibrate(tiny_vit, fmnist[0][:100], "W2A8")
    handles = weight_handles(FxSession(prepared).all_handles)
    # qkv, proj, fc1, fc2 per block, patch embedding, head; and one constant the graph quantizes (position
    # embedding), whose observer reads a parameter: a weight too
    assert len(handles) == 4 * 4 + 2 + 1
    assert_seed_lowers_every_weight_error(handles)


def test_weight_mse_seed_for_pt2e_and_modelopt_weights(tiny_vit, fmnist):
    calib = fmnist[0][:100]
    pytest.importorskip("torchao")
    from benchmarks.accuracy import quantize_linear, quantize_pt2e

    pt2e = quantize_pt2e(tiny_vit, calib, "W2A8", "baseline")
    assert_seed_lowers_every_weight_error(weight_handles(FxSession(pt2e, flavor="pt2e").all_handles))
    pytest.importorskip("modelopt")
    from cptv_plugin.amax.modelopt import modelopt_kind
    from cptv_plugin.amax.session import AmaxSession

    modelopt_model = quantize_linear(tiny_vit, calib, "W2A8", "baseline")
    handles = weight_handles(AmaxSession(modelopt_model, modelopt_kind()).all_handles)
    assert len(handles) == 4 * 4 + 2  # qkv, proj, fc1, fc2 per block; patch-embedding conv; head
    assert_seed_lowers_every_weight_error(handles)


def test_weight_mse_seed_for_pytorch_quantization_weights(tiny_vit, fmnist):
    pytest.importorskip("pytorch_quantization")
    from cptv_plugin.amax.pytorch_quantization import pytorch_quantization_kind
    from cptv_plugin.amax.session import AmaxSession

    calib = fmnist[0][:100]
    model = cptv_plugin.quantize_pytorch_quantization(copy.deepcopy(tiny_vit), "W2A8", calib)
    handles = weight_handles(AmaxSession(model, pytorch_quantization_kind()).all_handles)
    assert len(handles) == 4 * 4 + 2
    assert_seed_lowers_every_weight_error(handles)


def test_activation_scales_have_no_weight_seed(tiny_vit, fmnist):
    prepared = prepare_and_calibrate(tiny_vit, fmnist[0][:100], "W2A8")
    session = FxSession(prepared)
    activation = next(h for h in session.all_handles if h.role == "activation")
    assert weight_mse_scale(activation) is None
    block = session.groups[1]
    (vector,) = seed_vectors(block, ("weight_mse",))
    assert vector.shape == block.read().shape
    offset = 0
    for handle in block.handles:  # activation entries keep their scale; weight entries take the seed
        count = handle.read().numel()
        expected = handle.read() if handle.role == "activation" else weight_mse_scale(handle)
        torch.testing.assert_close(vector[offset:offset + count], expected.reshape(-1).float(), rtol=0, atol=0)
        offset += count


def test_search_adopts_the_seed_only_through_the_fitness(tiny_vit, fmnist):
    """P=2, C=0: the only member beside the current scales is the seed; at W2A8 it wins in every block; without
    seeds that member is a mutation instead, so the scales differ from the seed."""
    calib = fmnist[0][:100]
    prepared = prepare_and_calibrate(tiny_vit, calib, "W2A8")
    session = FxSession(prepared)
    seeds = {g.name: seed_vectors(g, ("weight_mse",))[0] for g in session.groups[1:-1]}

    seeded = copy.deepcopy(prepared)
    result = cptv_plugin.refine_fx(seeded, calib, config=ONE_VISIT_SEEDED)
    assert result.evaluations == 1 + 4  # initial fitness + one member per block visit: the count is unchanged
    assert result.final_fitness < result.initial_fitness
    unseeded = copy.deepcopy(prepared)
    cptv_plugin.refine_fx(unseeded, calib, config=ONE_VISIT_SEEDED.replace(seed_candidates=()))

    def block_vectors(model):
        groups = FxSession(model).groups[1:-1]
        return {g.name: g.read() for g in groups}

    adopted = [name for name, v in block_vectors(seeded).items() if torch.allclose(v, seeds[name], rtol=1e-6)]
    assert adopted, "the seeded run adopted no seed"
    assert not any(torch.allclose(v, seeds[name], rtol=1e-6) for name, v in block_vectors(unseeded).items())


def test_only_the_default_preset_seeds_and_unknown_seeds_are_refused():
    assert SearchConfig().seed_candidates == SearchConfig.default().seed_candidates == ("weight_mse",)
    assert SearchConfig.paper().seed_candidates == SearchConfig.fast().seed_candidates == ()
    assert SearchConfig(seed_candidates=()).seed_candidates == ()
    with pytest.raises(ValueError, match="seed_candidates"):
        SearchConfig(seed_candidates=("nope",))
    with pytest.raises(ValueError, match="seed_candidates"):
        SearchConfig(seed_candidates="weight_mse")
