"""Seed and start candidates (MSE-clipped weight scales and activation ranges) for every framework, and how
the search uses them."""

import copy
import math

import pytest
import torch

import cptv_plugin
from cptv_plugin import SearchConfig
from cptv_plugin.fx.refine import FxSession
from cptv_plugin.starts import STARTS, seed_vectors, weight_mse_scale
from conftest import prepare_and_calibrate

ONE_VISIT_SEEDED = SearchConfig(passes=1, population=2, cycles=0, samples=1, batch_size=50, progress=False,
                                search_outside_blocks=False, seed_candidates=("weight_mse",), start_candidates=(),
                                gradient_steps=0)


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


# ------------------------------------------------------------------------------ start candidates


def full_precision_runner(session, images):
    """What the refinement hands a start: runs ``images`` through the session's model with quantization off."""

    def run_full_precision():
        session.set_quantization(False)
        try:
            with torch.no_grad():
                session.chain.forward(images, eager=True)
        finally:
            session.set_quantization(True)

    return run_full_precision


def captured_inputs(session, handles, images):
    """The full-precision tensors each handle's input module sees (quantization off), by handle."""
    seen = {h: [] for h in handles}
    hooks = [h.input_module.register_forward_pre_hook(lambda m, args, h=h: seen[h].append(args[0].detach().float()))
             for h in handles]
    try:
        full_precision_runner(session, images)()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def activation_error(handle, inputs, scale):
    return sum(float((handle.fake_quantize(x, scale) - x).pow(2).sum()) for x in inputs)


def modelopt_session(tiny_vit, calib, bits):
    pytest.importorskip("modelopt")
    from benchmarks.accuracy import quantize_linear
    from cptv_plugin.amax.modelopt import modelopt_kind
    from cptv_plugin.amax.session import AmaxSession

    return AmaxSession(quantize_linear(tiny_vit, calib, bits, "baseline"), modelopt_kind())


@pytest.mark.parametrize("framework", ["fx", "modelopt"])
def test_handle_fake_quantize_is_the_evaluation_forward(tiny_vit, fmnist, framework):
    """What the activation start judges a scale by is exactly what the quantizer computes in the model."""
    calib = fmnist[0][:100]
    session = FxSession(prepare_and_calibrate(tiny_vit, calib, "W4A4"), target="fake_quant") if framework == "fx" \
        else modelopt_session(tiny_vit, calib, "W4A4")
    handles = [h for h in session.all_handles if h.role == "activation" and h.input_module is not None]
    assert len(handles) >= 4 * 4
    seen = captured_inputs(session, handles, calib[:20])
    for handle in handles:
        x = seen[handle][0]
        for ratio in (1.0, 0.3):
            scale = handle.read() * ratio
            handle.set(scale)
            with torch.no_grad():
                expected = handle.input_module(x)
            torch.testing.assert_close(handle.fake_quantize(x, scale), expected, rtol=0, atol=1e-6)
        handle.set(scale / 0.3)


@pytest.mark.parametrize("framework", ["fx", "modelopt"])
def test_activation_mse_start_lowers_every_activation_error(tiny_vit, fmnist, framework):
    calib = fmnist[0][:100]
    session = FxSession(prepare_and_calibrate(tiny_vit, calib, "W4A4"), target="fake_quant") if framework == "fx" \
        else modelopt_session(tiny_vit, calib, "W4A4")
    handles = session.all_handles
    activations = [h for h in handles if h.role == "activation" and h.input_module is not None]
    before = {h: h.read().clone() for h in handles}
    started = STARTS["activation_mse"](handles, full_precision_runner(session, calib[:64]))
    assert all(h.role == "activation" for h in started)  # weights keep their scales
    assert len(started) >= len(activations) // 2  # 4-bit MinMax ranges are far wider than the MSE optimum
    seen = captured_inputs(session, list(started), calib[:64])
    assert sum(float(scale) < float(before[handle]) for handle, scale in started.items()) >= len(started) // 2
    for handle, scale in started.items():
        assert activation_error(handle, seen[handle], scale) < activation_error(handle, seen[handle], before[handle])
    for handle in handles:  # judging scales moved none of them
        assert torch.equal(handle.read(), before[handle])


def test_activation_mse_start_does_not_depend_on_how_the_inputs_are_sliced(tiny_vit, fmnist, monkeypatch):
    """The errors are summed slice by slice (on the CPU in cache-sized slices): the chosen scales are the same
    with 64 input elements a slice."""
    import cptv_plugin.starts as starts

    calib = fmnist[0][:100]
    session = FxSession(prepare_and_calibrate(tiny_vit, calib, "W4A4"), target="fake_quant")
    run_full_precision = full_precision_runner(session, calib[:16])
    chosen = []
    for elements in (2 ** 22, 64 * len(starts.ACTIVATION_RATIOS)):  # one slice per call; 64 elements a slice
        monkeypatch.setitem(starts._ERROR_ELEMENTS, "cpu", elements)
        chosen.append(starts.activation_mse_scales(session.all_handles, run_full_precision, sample=4096))
    assert len(chosen[0]) >= 8 and chosen[0].keys() == chosen[1].keys()
    assert all(torch.equal(chosen[0][h], chosen[1][h]) for h in chosen[0])


# the groups outside the blocks included: clipping only the blocks' activation ranges at 4 bits, with MinMax
# ranges left before and after them, measured worse than MinMax everywhere (InfoNCE 5.5 vs 3.9 here)
ONE_VISIT_STARTED = SearchConfig(passes=1, population=1, cycles=0, samples=1, batch_size=50, progress=False,
                                 seed_candidates=(), start_candidates=("activation_mse",), gradient_steps=0)


def test_search_starts_from_the_fitter_of_the_given_scales_and_each_candidate(tiny_vit, fmnist, monkeypatch):
    """P=1, C=0: no candidate besides the start, so the scales the search ends with are the start it chose."""
    calib = fmnist[0][:100]
    prepared = prepare_and_calibrate(tiny_vit, calib, "W4A4")
    given = {h.name: h.read() for h in FxSession(prepared, target="fake_quant").all_handles}

    started = copy.deepcopy(prepared)
    result = cptv_plugin.refine_fx(started, calib, config=ONE_VISIT_STARTED, target="fake_quant")
    assert result.start["chosen"] == "activation_mse"
    assert result.start["activation_mse"] < result.start["given"] == result.initial_fitness
    assert result.final_fitness == result.start["activation_mse"]
    assert result.evaluations == 2  # the given scales and the candidate
    moved = {h.name for h in FxSession(started, target="fake_quant").all_handles
             if not torch.equal(h.read(), given[h.name])}
    assert moved and all(not name.endswith("weight") for name in moved)

    def inflated(handles, run_full_precision):  # a start far worse than the given scales
        return {h: h.read() * 50 for h in handles if h.role == "activation"}

    monkeypatch.setitem(STARTS, "inflated", inflated)
    kept = copy.deepcopy(prepared)
    result = cptv_plugin.refine_fx(kept, calib, config=ONE_VISIT_STARTED.replace(start_candidates=("inflated",)),
                                   target="fake_quant")
    assert result.start["chosen"] == "given" and result.start["inflated"] >= result.start["given"]  # ties keep it
    for handle in FxSession(kept, target="fake_quant").all_handles:
        assert torch.equal(handle.read(), given[handle.name]), handle.name


def test_a_far_off_start_is_judged_by_agreement_not_by_a_collapsed_fitness(tiny_vit, fmnist):
    """4-bit activations on every op of the CI ViT, only the blocks searched: the given model's outputs are
    constant (InfoNCE exactly ln 50, 13 % agreement); the clipped blocks give an informative model with a worse
    InfoNCE. The fitness alone would keep the collapsed model; the agreement with the full-precision model picks
    the informative one."""
    calib = fmnist[0][:100]
    config = ONE_VISIT_STARTED.replace(search_outside_blocks=False)
    result = cptv_plugin.refine_fx(prepare_and_calibrate(tiny_vit, calib, "W4A4"), calib, config=config,
                                   target="fake_quant")
    start = result.start
    assert start["given"] == pytest.approx(math.log(50), abs=1e-4) and start["activation_mse"] > start["given"]
    assert start["judged_by"] == "agreement" and start["agreement"]["given"] < 0.5
    assert start["agreement"]["activation_mse"] > start["agreement"]["given"]
    assert start["chosen"] == "activation_mse" and result.final_fitness == start["activation_mse"]
    sound = cptv_plugin.refine_fx(prepare_and_calibrate(tiny_vit, calib, "W8A8"), calib, config=config)
    assert sound.start["judged_by"] == "fitness" and "agreement" not in sound.start


def test_a_resumed_search_does_not_judge_its_starts_again(tmp_path, monkeypatch):
    """The start is part of the checkpointed scales: interrupted and resumed, the search ends with exactly the
    scales of an uninterrupted run and does not evaluate the starts a second time."""
    from cptv_plugin.search import evolutionary_search
    from test_search import interrupt_and_resume, make_problem

    starts = {"near": [torch.full((5,), 1.15) for _ in range(3)]}
    config = SearchConfig(passes=2, population=3, cycles=1, samples=2, progress=False,
                          checkpoint_path=str(tmp_path / "a.ckpt"))
    groups, evaluator = make_problem()
    done = evolutionary_search(groups, evaluator, config, fingerprint="toy", starts=starts)
    expected = [g.read() for g in groups]
    assert done.start["chosen"] == "near" and done.start["near"] < done.start["given"]
    _, resumed, groups, evaluator = interrupt_and_resume(make_problem, config, tmp_path, monkeypatch, stop_after=2,
                                                         starts=starts)
    assert resumed.resumed_from == 2 and resumed.start is None
    assert None not in evaluator.calls  # no full evaluation of the given scales or the starts again
    for got, want in zip([g.read() for g in groups], expected):
        assert torch.equal(got, want)


def test_presets_and_unknown_starts():
    assert SearchConfig().start_candidates == SearchConfig.fast().start_candidates == ("activation_mse",)
    assert SearchConfig.paper().start_candidates == ()
    with pytest.raises(ValueError, match="start_candidates"):
        SearchConfig(start_candidates=("nope",))
    with pytest.raises(ValueError, match="start_candidates"):
        SearchConfig(start_candidates="activation_mse")
