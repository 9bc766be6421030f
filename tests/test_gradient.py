"""The gradient stage: after the search, Adam moves every scale on a differentiable fitness (cptv_plugin.gradient)."""

import contextlib
import logging

import pytest
import torch

import cptv_plugin
from cptv_plugin import SearchConfig
from cptv_plugin.fitness import kl
from cptv_plugin.fx.refine import FxSession
from conftest import prepare_and_calibrate

# one visit of one member per group (the search changes nothing), then the gradient stage alone
GRADIENT_ONLY = SearchConfig(passes=0, population=1, cycles=0, samples=1, batch_size=50, progress=False,
                             search_outside_blocks=False, seed_candidates=(), start_candidates=(),
                             gradient_steps=60, gradient_lr=0.01, gradient_grace=0)  # these stages are short:
# the default's grace (110 steps) would cover every check


def modelopt_w2a8(tiny_vit, calib):
    pytest.importorskip("modelopt")
    from benchmarks.accuracy import quantize_linear

    return quantize_linear(tiny_vit, calib, "W2A8", "baseline")


def amax_of(model):
    return {name: module.amax.detach().clone() for name, module in model.named_modules()
            if name.endswith("_quantizer") and module.is_enabled}


def mean_kl(model, reference_model, calib):
    with torch.no_grad():
        return sum(float(kl(model(batch), reference_model(batch))) for batch in calib.split(50)) / len(calib.split(50))


def test_gradient_stage_lowers_the_fitness_the_framework_itself_computes(tiny_vit, fmnist):
    """What the hooks optimized is what ModelOpt's own quantizers compute with the committed amax."""
    calib = fmnist[0]
    model = modelopt_w2a8(tiny_vit, calib)
    given = amax_of(model)
    result = cptv_plugin.refine(model, calib, config=GRADIENT_ONLY)
    record = result.gradient
    assert record["kept"] and record["loss_after"] < record["loss_before"]
    assert result.evaluations == 1 and result.history == []  # passes=0: the initial fitness, no search visit
    searched = [name for name in given if name.startswith("blocks.")]  # not the patch embedding and head
    assert record["scales"] == len(searched) == 4 * 8 and record["fixed"] == 0
    moved = amax_of(model)
    assert all(torch.equal(moved[name], given[name]) != (name in searched) for name in given)
    # the framework's forward, without any hook, at the committed amax: the loss the stage reported
    assert mean_kl(model, tiny_vit, calib) == pytest.approx(record["loss_after"], rel=1e-4)
    unrefined = modelopt_w2a8(tiny_vit, calib)
    assert mean_kl(unrefined, tiny_vit, calib) == pytest.approx(record["loss_before"], rel=1e-4)


def test_gradient_stage_moves_fx_scales_and_convert_fx_carries_them(tiny_vit, fmnist):
    from torch.ao.quantization.quantize_fx import convert_fx

    calib = fmnist[0]
    # 3-bit weights: torch.ao's MinMax puts each channel's largest weight on a rounding tie (|w| / s = (2^b - 1) / 2),
    # so at 2 bits any move of the given scale flips those weights between -2 and -1 steps, a cliff the
    # straight-through gradient cannot see: whether the first steps gain then depends on the last bit of x · (1/s)
    refined = prepare_and_calibrate(tiny_vit, calib, "W3A8")
    result = cptv_plugin.refine_fx(refined, calib, config=GRADIENT_ONLY)
    record = result.gradient
    assert record["kept"] and record["loss_after"] < record["loss_before"]
    assert record["loss_after"] == pytest.approx(min(check["loss"] for check in record["history"]), abs=1e-6)
    assert (f"gradient stage kl {record['loss_before']:.4g} -> {record['loss_after']:.4g} in "
            f"{GRADIENT_ONLY.gradient_steps} steps (kept)") in str(result)
    # the committed scales, in the simulated model without hooks (its weights are cached when no gradient is
    # recorded: a stale cache once hid every weight move from the stage's checks), give the loss it reported
    assert mean_kl(FxSession(refined).eval_module, tiny_vit, calib) == pytest.approx(record["loss_after"], rel=1e-4)
    plain = prepare_and_calibrate(tiny_vit, calib, "W3A8")
    assert cptv_plugin.refine_fx(plain, calib, config=GRADIENT_ONLY.replace(gradient_steps=0)).gradient is None
    # the converted models differ, and the refined one is closer to the full-precision model on these images
    assert mean_kl(convert_fx(refined), tiny_vit, calib) < mean_kl(convert_fx(plain), tiny_vit, calib)


def interrupt_at_third_adam_step(monkeypatch) -> list:
    """Ctrl-C in the gradient stage's third step; returns the list of steps taken (one entry each)."""
    calls = []

    def interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(torch.optim.Adam, "step", interrupt)
    return calls


def weights_beyond_their_grid(handles) -> int:
    """How many of ``handles``' weights (FX, narrower than int8) lie outside the grid of the current scales."""
    from cptv_plugin.fx.handles import clamp_weight_to_grid

    return sum(clamp_weight_to_grid(h.weight.detach().clone(), h.read(), h.zero_points(), h.quant_min, h.quant_max,
                                    h.axis) for h in handles if h.clamps_weight)


@pytest.mark.parametrize("clip", ["before", "never"])
def test_the_stage_learns_scales_for_the_weights_the_commit_will_clip(tiny_vit, fmnist, monkeypatch, clip):
    """gradient_clip_weights: FX weights narrower than int8 are clipped onto their grid at the searched scales
    before the stage starts (as the commit clips them at the final ones), so that the straight-through gradient sees
    the weights convert_fx holds; off by default."""
    import cptv_plugin.refinement as refinement

    calib = fmnist[0]
    beyond = []

    def counting(handles, *args, **kwargs):
        beyond.append(weights_beyond_their_grid(handles))
        return gradient_refine(handles, *args, **kwargs)

    gradient_refine = refinement.gradient_refine
    monkeypatch.setattr(refinement, "gradient_refine", counting)
    prepared = prepare_and_calibrate(tiny_vit, calib, "W3A8")  # MinMax: each channel's largest weight beyond it
    assert weights_beyond_their_grid(FxSession(prepared).all_handles) > 0
    config = GRADIENT_ONLY.replace(gradient_steps=10, gradient_checks=2, gradient_clip_weights=clip)
    record = cptv_plugin.refine_fx(prepared, calib, config=config).gradient
    assert (beyond == [0]) == (clip == "before") and (record.get("clipped_weights", 0) > 0) == (clip == "before")
    assert SearchConfig().gradient_clip_weights == "never"
    assert weights_beyond_their_grid(FxSession(prepared, clamp_weights=True).all_handles) == 0  # the commit's


def test_the_first_overshoot_clips_the_weights_instead_of_cutting_the_rate(tiny_vit, fmnist):
    """gradient_clip_weights="on_overshoot": the first check above the start clips the weights at the best scales
    so far (here the given ones) and keeps the rate; a later overshoot cuts it as usual."""
    calib = fmnist[0]
    prepared = prepare_and_calibrate(tiny_vit, calib, "W3A8")
    config = GRADIENT_ONLY.replace(gradient_steps=3, gradient_checks=3, gradient_lr=5.0,
                                   gradient_clip_weights="on_overshoot")
    record = cptv_plugin.refine_fx(prepared, calib, config=config).gradient
    history = record["history"]
    assert history[1]["loss"] > record["loss_before"]  # a rate of 5 on log-scales overshoots at once
    assert record["clipped_at"] == 1 and record["clipped_weights"] > 0 and history[2]["lr"] == 5.0
    cut = history[2]["loss"] > record["loss_before"]
    assert record["backtracks"] == int(cut) and history[3]["lr"] == (0.5 if cut else 5.0)
    if not record["kept"]:  # the handles were moved to clip and put back: the given scales are committed
        given = FxSession(prepare_and_calibrate(tiny_vit, calib, "W3A8")).all_handles
        assert all(torch.equal(h.read(), g.read()) for h, g in zip(FxSession(prepared).all_handles, given))


def test_an_overshoot_with_no_weight_to_clip_cuts_the_rate_as_without_the_clip(tiny_vit, fmnist):
    """At 8-bit weights the commit clips nothing (the grid is the dtype's), so "on_overshoot" has nothing to offer
    in place of the cut: the stage runs as with "never" instead of retrying the overshooting rate."""
    calib = fmnist[0]
    config = GRADIENT_ONLY.replace(gradient_steps=3, gradient_checks=3, gradient_lr=5.0)
    records = [cptv_plugin.refine_fx(prepare_and_calibrate(tiny_vit, calib, "W8A8"), calib,
                                     config=config.replace(gradient_clip_weights=clip)).gradient
               for clip in ("never", "on_overshoot")]
    assert records[0]["history"][1]["loss"] > records[0]["loss_before"] and records[0]["backtracks"] >= 1
    assert records[1]["history"] == records[0]["history"] and records[1]["backtracks"] == records[0]["backtracks"]
    assert "clipped_at" not in records[1]


def test_ctrl_c_in_the_stage_with_restore_gives_back_the_weights_clipped_at_the_given_scales(tiny_vit, fmnist,
                                                                                               monkeypatch):
    """on_interrupt="restore": the given scales, and the weights as the commit of those scales clips them, not as
    the stage's start clipped them at the searched scales."""
    calib = fmnist[0]
    prepared = prepare_and_calibrate(tiny_vit, calib, "W3A8")
    unrefined = prepare_and_calibrate(tiny_vit, calib, "W3A8")
    FxSession(unrefined).commit()  # the weights clipped at the given scales
    calls = interrupt_at_third_adam_step(monkeypatch)
    config = GRADIENT_ONLY.replace(passes=1, population=4, cycles=2, samples=2, on_interrupt="restore",
                                   gradient_clip_weights="before")
    result = cptv_plugin.refine_fx(prepared, calib, config=config)
    assert result.interrupted and result.history and calls == [1, 1, 1]  # a search ran, then the stage was stopped
    expected = unrefined.state_dict()
    weights = [name for name in expected if name.endswith(".weight")]
    assert weights and all(torch.equal(prepared.state_dict()[name], expected[name]) for name in weights)


@pytest.mark.parametrize("backtrack", [10.0, 2.0])
def test_a_rate_that_overshoots_backtracks_and_a_stage_that_never_gains_leaves_the_search_scales(tiny_vit, fmnist,
                                                                                                 backtrack, caplog):
    calib = fmnist[0]
    model = modelopt_w2a8(tiny_vit, calib)
    given = amax_of(model)
    with caplog.at_level(logging.WARNING, logger="cptv_plugin.gradient"):
        result = cptv_plugin.refine(model, calib, config=GRADIENT_ONLY.replace(gradient_steps=2, gradient_lr=5.0,
                                                                               gradient_backtrack=backtrack))
    record = result.gradient
    # the first check is above the start: the rate drops by `backtrack` for the second step, which gains nothing
    assert [check["lr"] for check in record["history"]] == [5.0, 5.0, 5.0 / backtrack]
    assert record["backtracks"] == 1  # the last check is the end: no cut after it
    assert all(check["loss"] > record["loss_before"] for check in record["history"][1:])
    assert not record["kept"] and record["loss_after"] == record["loss_before"]
    assert all(torch.equal(value, given[name]) for name, value in amax_of(model).items())
    # the cut came at step 1, within Adam's first rise: the warning names a grace past step 100 (checks every
    # step: 110), not a smaller rate
    warning = next(r.getMessage() for r in caplog.records if "never fell below" in r.getMessage())
    assert "gradient_grace=110" in warning and "cut at step 1" in warning and "gradient_lr" not in warning


def test_checks_within_the_grace_steps_keep_the_rate(tiny_vit, fmnist, caplog):
    calib = fmnist[0]
    model = modelopt_w2a8(tiny_vit, calib)
    given = amax_of(model)
    config = GRADIENT_ONLY.replace(gradient_steps=3, gradient_checks=3, gradient_lr=5.0, gradient_grace=2)
    with caplog.at_level(logging.INFO, logger="cptv_plugin.gradient"):
        record = cptv_plugin.refine(model, calib, config=config).gradient
    assert not any("gradient_grace=" in r.getMessage() for r in caplog.records)  # a grace is set: no advice
    # the check after step 1 overshoots inside the grace: the rate stays; the one after step 2 may cut it
    assert record["history"][1]["loss"] > record["loss_before"]
    assert [check["lr"] for check in record["history"]][:3] == [5.0, 5.0, 5.0] and record["grace"] == 2
    assert record["backtracks"] == (1 if record["history"][2]["loss"] > record["loss_before"] else 0)
    if not record["kept"]:
        assert all(torch.equal(value, given[name]) for name, value in amax_of(model).items())


def test_ctrl_c_in_the_gradient_stage_keeps_the_search_scales(tiny_vit, fmnist, monkeypatch):
    calib = fmnist[0]
    model = modelopt_w2a8(tiny_vit, calib)
    given = amax_of(model)
    calls = interrupt_at_third_adam_step(monkeypatch)
    result = cptv_plugin.refine(model, calib, config=GRADIENT_ONLY)
    assert result.interrupted and result.gradient["interrupted"] and calls == [1, 1, 1]
    assert all(torch.equal(value, given[name]) for name, value in amax_of(model).items())


def test_straight_through_fake_quantize_is_the_evaluation_forward_and_has_a_scale_gradient(tiny_vit, fmnist):
    """Per-channel weight scales (axis 0) through the framework-neutral arithmetic: the value of the FX simulated
    quantizer, and a finite, non-zero gradient in the scale (LSQ's estimator)."""
    session = FxSession(prepare_and_calibrate(tiny_vit, fmnist[0][:100], "W2A8"))
    handles = [h for h in session.all_handles if h.role == "weight" and h.axis is not None and h.weight is not None]
    assert handles
    for handle in handles:
        weight = handle.weight.detach()
        with torch.no_grad():
            expected = handle.quantizer_module(weight)
        scale = handle.read().clone().requires_grad_()
        quantized = handle.fake_quantize(weight, scale, straight_through=True)
        torch.testing.assert_close(quantized.detach(), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(handle.fake_quantize(weight, handle.read()), expected, rtol=0, atol=1e-6)
        (gradient,) = torch.autograd.grad(quantized.pow(2).sum(), scale)
        assert bool(torch.isfinite(gradient).all()) and bool((gradient != 0).any()), handle.name


def test_modelopt_switched_for_compiling_passes_gradients_as_modelopt_does(tiny_vit, fmnist):
    """The traceable fake quant a compiled (or CUDA-graphed) stage runs ModelOpt's quantizers through passes
    gradients straight through the rounding like ModelOpt's own: a quantizer the stage does not move (outside the
    searched groups) once cut the gradient of every scale before it."""
    from cptv_plugin.amax.modelopt import _compilable
    from modelopt.torch.quantization.nn import TensorQuantizer

    calib = fmnist[0][:20]
    model = modelopt_w2a8(tiny_vit, fmnist[0])
    quantizers = [q for q in model.modules() if isinstance(q, TensorQuantizer) and q.is_enabled]
    gradients = []
    for switched in (False, True):
        images = calib.clone().requires_grad_()
        with _compilable(model, quantizers) if switched else contextlib.nullcontext():
            (gradient,) = torch.autograd.grad(model(images).pow(2).sum(), images)
        gradients.append(gradient)
    assert bool((gradients[0] != 0).any())
    # the same direction (cosine 0.9997 measured; 0 before the fix); the clipping masks differ at the negative
    # edge (ModelOpt: |x| <= amax; the integer route: the integer range, one step wider)
    assert float(torch.nn.functional.cosine_similarity(gradients[0].flatten(), gradients[1].flatten(), dim=0)) > 0.999


def test_stage_runs_the_learned_fake_quant_instead_of_the_quantizers_own(tiny_vit, fmnist, monkeypatch):
    """The stage's steps and checks run no quantizer's own fake quantization (a forward hook ran it and threw the
    result away: kernels every step paid for), and every quantizer's forward is its own again afterwards."""
    from cptv_plugin.fx.quantizers import SimulatedQuantizer
    from cptv_plugin.gradient import gradient_refine

    calib = fmnist[0][:100]
    session = FxSession(prepare_and_calibrate(tiny_vit, calib, "W3A8"))
    handles = session.all_handles
    quantizers = {h.quantizer_module for h in handles}
    assert quantizers and all(isinstance(q, SimulatedQuantizer) for q in quantizers)
    batches = list(calib.split(50))
    with torch.no_grad():
        reference = [tiny_vit(b) for b in batches]
    calls = []
    own_forward = SimulatedQuantizer.forward
    monkeypatch.setattr(SimulatedQuantizer, "forward", lambda self, x: calls.append(self) or own_forward(self, x))
    # four steps at 3e-3 lower the KL 0.0291 -> 0.0253 (at 1e-2 the first check overshoots: nothing would be kept)
    record = gradient_refine(handles, session.chain.forward, batches, reference, steps=4, lr=0.003, checks=2)
    assert record["kept"] and not calls
    assert not any("forward" in vars(q) for q in quantizers)
    with torch.no_grad():  # the model's own quantizers run again, at the committed scales
        session.chain.forward(batches[0])
    assert set(calls) == quantizers
    # no steps: nothing replaced, the record has every key a stage's record has
    nothing = gradient_refine(handles, session.chain.forward, batches, reference, steps=0, lr=0.01)
    assert set(nothing) == set(record) and not nothing["kept"] and not nothing["cuda_graph"]


def test_gradient_settings_are_validated_the_paper_preset_has_no_stage_and_fast_a_short_one():
    assert SearchConfig().gradient_steps == 1000 and SearchConfig.paper().gradient_steps == 0
    assert SearchConfig.fast().gradient_steps == 300
    # fast's checks cut the rate only from step 100 (FINDINGS 42-44), the default's from step 110 (section 47)
    assert SearchConfig.fast().gradient_grace == 100 and SearchConfig().gradient_grace == 110
    assert SearchConfig.paper().gradient_grace == 110 and SearchConfig.paper().gradient_steps == 0  # no stage at all
    assert SearchConfig.fast(gradient_grace=0).gradient_grace == 0
    for changes, name in [({"gradient_steps": -1}, "gradient_steps"), ({"gradient_lr": 0.0}, "gradient_lr"),
                          ({"gradient_fitness": "nope"}, "gradient_fitness"),
                          ({"gradient_checks": 0}, "gradient_checks"), ({"gradient_warmup": 1.5}, "gradient_warmup"),
                          ({"gradient_warmup": -0.1}, "gradient_warmup"),
                          ({"gradient_backtrack": 0.5}, "gradient_backtrack"),
                          ({"gradient_grace": -1}, "gradient_grace"),
                          ({"gradient_clip_weights": True}, "gradient_clip_weights"),
                          ({"gradient_batch_size": 50}, "gradient_batch_size")]:
        with pytest.raises(ValueError, match=name):
            SearchConfig(**changes)
    with pytest.raises(ValueError, match="fitness"):
        SearchConfig(fitness="nope")


def test_cuda_graph_setting_is_ignored_on_the_cpu(tiny_vit, fmnist):
    """The CPU has no CUDA graphs: the stage runs as without the setting (tests/test_gradient_cuda.py: the GPU)."""
    calib = fmnist[0]
    config = GRADIENT_ONLY.replace(gradient_steps=10, gradient_checks=2)
    records = [cptv_plugin.refine_fx(prepare_and_calibrate(tiny_vit, calib, "W3A8"), calib,
                                     config=config.replace(gradient_cuda_graph=graphed)).gradient
               for graphed in (False, True)]
    assert not records[1]["cuda_graph"]
    assert records[1]["history"] == records[0]["history"] and records[1]["kept"]


def _stale_compile(fn, **kwargs):
    """The outputs of the first call per batch, whatever the scales are now."""
    outputs = {}

    def compiled(images):
        if images.data_ptr() not in outputs:
            outputs[images.data_ptr()] = fn(images).detach()
        return outputs[images.data_ptr()]
    return compiled


def _gradient_free_compile(fn, **kwargs):
    """The same outputs, a zero gradient to everything upstream."""
    def compiled(images):
        output = fn(images)
        return output.detach() + 0 * output
    return compiled


@pytest.mark.parametrize("fake_compile, fault", [
    (_stale_compile, "ignores the learned scales"),
    (_gradient_free_compile, "passes no gradient to the learned scales"),
])
def test_a_compiled_model_that_does_not_train_the_scales_runs_the_stage_eagerly(tiny_vit, fmnist, monkeypatch,
                                                                                caplog, fake_compile, fault):
    """Compiled stages moved nothing on CUDA with torch 2.11: first a forward kept the scales it was traced with
    (FINDINGS section 39), then, on an H200, one followed them yet passed them no gradient (section 40). The stage
    finds either out before its first step and runs eagerly, as without compile."""
    calib = fmnist[0]
    config = GRADIENT_ONLY.replace(gradient_steps=10, gradient_checks=2)
    eager = cptv_plugin.refine_fx(prepare_and_calibrate(tiny_vit, calib, "W3A8"), calib, config=config).gradient

    monkeypatch.setattr(torch, "compile", fake_compile)
    with caplog.at_level("WARNING", logger="cptv_plugin.gradient"):
        record = cptv_plugin.refine_fx(prepare_and_calibrate(tiny_vit, calib, "W3A8"), calib,
                                       config=config.replace(compile=True)).gradient
    assert any(fault in r.message for r in caplog.records)
    assert record["compile_fallback"] == fault and not record["compiled"]
    assert record["history"] == eager["history"] and record["kept"]


def test_warmup_shrinks_the_first_steps(tiny_vit, fmnist):
    """Adam's early steps move each log-scale by about the rate whatever its gradient: over 4 steps of a cosine
    from lr, up to 2.5 lr; with the rate rising over all 4 steps (warmup=1), up to 1.2 lr."""
    from cptv_plugin.gradient import gradient_refine

    calib = fmnist[0][:100]
    session = FxSession(prepare_and_calibrate(tiny_vit, calib, "W3A8"))
    handles = session.all_handles
    given = [h.read() * 1.01 for h in handles]  # off torch.ao's ties (FINDINGS section 19): 0.0323 -> 0.0279 / 0.0217
    batches = list(calib.split(50))
    with torch.no_grad():
        reference = [tiny_vit(b) for b in batches]
    lr, moves = 0.01, []
    for warmup in (0.0, 1.0):
        for handle, value in zip(handles, given):
            handle.set(value)
        # checks=1: the last step's scales are the result (kept: they beat the start)
        record = gradient_refine(handles, session.chain.forward, batches, reference, steps=4, lr=lr, checks=1,
                                 warmup=warmup)
        assert record["kept"] and record.get("warmup", 0.0) == warmup
        moves.append(max(float((h.read() / g).log().abs().max()) for h, g in zip(handles, given)))
    assert moves[0] > 2.0 * lr and 0.5 * lr < moves[1] < 1.3 * lr, moves


def lsq_reference(inputs, scale, zero_point, low, high, axis):
    """torch's own LSQ kernels (``torch._fake_quantize_learnable_per_*_affine``, gradient factor 1): the output
    and a function of the output's gradient giving the input's and the scale's."""
    inputs = inputs.detach().clone().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    zero_point = zero_point.detach().float().clone().requires_grad_()
    if axis is None:
        output = torch._fake_quantize_learnable_per_tensor_affine(inputs, scale, zero_point, low, high, 1.0)
    else:
        output = torch._fake_quantize_learnable_per_channel_affine(inputs, scale, zero_point, axis, low, high, 1.0)

    def gradients(gradient):
        return torch.autograd.grad(output, (inputs, scale), gradient)
    return output.detach(), gradients


def learned_fake_quant(handle):
    """The stage's forward for ``handle``'s quantizer at its own scale (log factor 0, whose gradient it fills)."""
    from cptv_plugin.gradient import _LearnedFakeQuant, _LearnedScales

    learned = _LearnedScales([handle.read().clone()], [torch.zeros_like(handle.read(), requires_grad=True)])
    learned.update()
    return _LearnedFakeQuant(handle, learned, 0)


def test_learned_fake_quant_has_the_values_of_the_handle_and_the_gradients_of_torchs_lsq(tiny_vit, fmnist):
    """The stage's fake quant: the handle's own values, and the straight-through gradients of torch's LSQ kernels
    (∂y/∂x = 1 where the rounded value is inside the integer range, bounds included; ∂y/∂s = round(x/s) − x/s
    there, the clipped bound outside), fixed whatever torch's version (torch.clamp's gradient at its bounds is
    1 in torch 2.11, 0 in 2.14). Symmetric quantizers (zero points all 0) skip adding and subtracting them."""
    from cptv_plugin.gradient import _StraightThroughFakeQuant
    from cptv_plugin.handles import affine_fake_quantize_with_mask, round_values

    values = torch.tensor([-2.5, -1.5, -0.4, 0.5, 1.49, 2.5, 3.7], requires_grad=True)
    rounded = round_values(values, straight_through=True)
    assert torch.equal(rounded, torch.round(values.detach()))
    rounded.sum().backward()
    assert torch.equal(values.grad, torch.ones_like(values))

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(4, 6, 5, generator=generator)
    inputs[0, :, 0] = torch.tensor([1.0, 0.5, -1.0, 0.25, 0.3, 1.0])  # on the range's bounds after rounding
    for axis, base, zero_point in [(1, torch.rand(6, generator=generator) * 0.3 + 0.2,
                                    torch.tensor([0, 1, -1, 0, -2, 0])),
                                   (None, torch.tensor([0.3]), torch.tensor([1]))]:
        log_factor = torch.zeros_like(base, requires_grad=True)
        mine_inputs = inputs.clone().requires_grad_()
        mine = _StraightThroughFakeQuant.apply(
            mine_inputs, log_factor, base,
            lambda x, s: affine_fake_quantize_with_mask(x, s, zero_point, -2, 1, axis), axis)
        output, gradients = lsq_reference(inputs, base, zero_point, -2, 1, axis)
        assert torch.equal(mine.detach(), output)
        weights = torch.randn(inputs.shape, generator=generator)
        (mine * weights).sum().backward()
        input_gradient, scale_gradient = gradients(weights)
        assert torch.equal(mine_inputs.grad, input_gradient)
        # d/dδ of base·exp(δ) at δ = 0 is base: the learned factor's gradient is the scale's times the scale
        assert torch.allclose(log_factor.grad, scale_gradient * base, rtol=1e-5, atol=1e-6)

    calib = fmnist[0][:100]
    session = FxSession(prepare_and_calibrate(tiny_vit, calib, "W3A8"))
    kinds = {"weight": 0, "activation": 0}
    for handle in session.all_handles:
        learned = learned_fake_quant(handle)
        kinds[handle.role] += learned.symmetric
        if handle.role != "weight" or not learned.symmetric:
            continue
        weight = handle.weight.detach()
        mine = learned(weight)
        assert torch.equal(mine, handle.fake_quantize(weight, handle.read()))
        output, gradients = lsq_reference(weight, handle.read(), handle.zero_points(), *handle.clamp_range(),
                                          handle.axis)
        mine.square().sum().backward()
        scale_gradient = gradients(2 * output)[1]
        assert torch.allclose(learned.log_factor.grad, scale_gradient * handle.read(), rtol=1e-5, atol=1e-7)
        # the handle's own straight-through fake quant (op by op, the stage's fallback) has them too
        own_scale = handle.read().clone().requires_grad_()
        handle.fake_quantize(weight, own_scale, straight_through=True).square().sum().backward()
        assert torch.allclose(own_scale.grad, scale_gradient, rtol=1e-4, atol=1e-5)
    # weights symmetric; activations affine, their zero point 0 only where the range starts at 0 (e.g. softmax)
    activations = sum(h.role == "activation" for h in session.all_handles)
    assert kinds["weight"] > 0 and kinds["activation"] < activations


def test_steps_packing_batches_keep_each_batch_its_own_fitness_batch(tiny_vit, fmnist):
    """``step_images`` packs whole calibration batches into one forward pass per step; InfoNCE still takes its
    negatives from each batch alone, so the checks equal the one-batch-per-step stage's (and not the fitness of
    merged batches), and the reported loss is the model's own mean fitness at the kept scales."""
    from cptv_plugin.fitness import infonce
    from cptv_plugin.gradient import gradient_refine

    calib = fmnist[0][:130]
    session = FxSession(prepare_and_calibrate(tiny_vit, calib, "W3A8"))
    handles = session.all_handles
    given = [h.read() * 1.01 for h in handles]  # off torch.ao's ties (FINDINGS section 19)
    batches = list(calib.split(50))  # 50, 50, 30: the last batch smaller
    with torch.no_grad():
        reference = [tiny_vit(b) for b in batches]

    def mean_infonce(images: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
        with torch.no_grad():
            values = [float(infonce(session.chain.forward(b), r, temperature=0.1, normalize=True))
                      for b, r in zip(images, targets)]
        return sum(values) / len(values)

    records = {}
    for step_images in (None, 100, 130):
        for handle, value in zip(handles, given):
            handle.set(value)
        records[step_images] = gradient_refine(handles, session.chain.forward, batches, reference, steps=6, lr=0.001,
                                               fitness="infonce", checks=1, step_images=step_images)
        assert records[step_images]["kept"]
        assert mean_infonce(batches, reference) == pytest.approx(records[step_images]["loss_after"], rel=1e-4)
    assert "step_images" not in records[None]
    assert records[100]["step_images"] == 100 and records[130]["step_images"] == 130
    for handle, value in zip(handles, given):
        handle.set(value)
    start = mean_infonce(batches, reference)
    merged = mean_infonce([calib[:100], calib[100:]], [torch.cat(reference[:2]), reference[2]])
    assert abs(merged - start) > 0.05  # 100 negatives are not 50: the packing must not merge the batches
    for record in records.values():
        assert record["loss_before"] == pytest.approx(start, rel=1e-5)
    # the packed steps are different steps: the runs end apart
    assert records[130]["loss_after"] != records[None]["loss_after"]


def test_learned_fake_quant_of_modelopt_has_its_values_and_the_gradients_of_torchs_lsq(tiny_vit, fmnist):
    """ModelOpt's arithmetic (x · (maxbound / amax), round, clamp, divide) through the stage's fake quant: the
    handle's own values, and the scale gradients of torch's LSQ kernel at scale = amax / maxbound."""
    pytest.importorskip("modelopt")
    from cptv_plugin.amax.modelopt import modelopt_kind
    from cptv_plugin.amax.session import AmaxSession
    session = AmaxSession(modelopt_w2a8(tiny_vit, fmnist[0]), modelopt_kind())
    checked = 0
    for handle in session.all_handles:
        if handle.role != "weight" or handle.quantizer_module is None:
            continue
        weight = handle.weight
        learned = learned_fake_quant(handle)
        assert learned.quantize is not None and not learned.symmetric
        mine = learned(weight.detach())
        assert torch.equal(mine, handle.fake_quantize(weight.detach(), handle.read()))
        output, gradients = lsq_reference(weight, handle.read().flatten(), torch.zeros(handle.read().numel()),
                                          handle.quant_min, handle.quant_max, handle.axis)
        assert torch.allclose(mine, output, rtol=1e-6, atol=0)  # q / (maxbound / amax) is not always q · amax
        mine.square().sum().backward()
        scale_gradient = gradients(2 * output)[1]
        assert torch.allclose(learned.log_factor.grad.flatten(), scale_gradient * handle.read().flatten(),
                              rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked == 4 * 4 + 2  # qkv, proj, fc1, fc2 of four blocks, the patch embedding, the head
