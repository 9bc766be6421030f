"""The gradient stage's step replayed as a CUDA graph (``SearchConfig.gradient_cuda_graph``): the eager step's
arithmetic. CUDA only (CI has no GPU): on the device, ``python3 -m pytest -q tests/test_gradient_cuda.py``."""

import copy
import functools
import math

import pytest
import torch

from cptv_plugin.engine import mean_fitness
from cptv_plugin.fitness import get_fitness
from cptv_plugin.gradient import gradient_refine
from conftest import prepare_and_calibrate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def stage_inputs(session, model, calib):
    """What a stage on CUDA takes: (handles, the scales to start from, batches of 50, their FP32 outputs, the eager
    forward). The start is 1 % off the given scales: torch.ao's MinMax puts each channel's largest weight exactly
    between two levels (FINDINGS section 18); from there the eager and the graphed steps moved 99 % of the scales
    apart by up to 0.5 % (an H200), from 1 % off by at most 2.4e-7."""
    handles = [h for g in session.groups for h in g.handles]
    batches = list(calib.cuda().split(50))
    with torch.no_grad():
        reference = [model(b) for b in batches]
    return (handles, [h.read() * 1.01 for h in handles], batches, reference,
            functools.partial(session.chain.forward, eager=True))


def modelopt_session(model, calib):
    """ModelOpt's default placement at W2A8 on ``model`` (on CUDA), as a refinement session."""
    from benchmarks.accuracy import quantize_linear
    from cptv_plugin.amax.modelopt import modelopt_kind
    from cptv_plugin.amax.session import AmaxSession

    return AmaxSession(quantize_linear(copy.deepcopy(model), calib.cuda(), "W2A8", "baseline"), modelopt_kind())


def stage_twice(session, model, calib):
    """The stage from the same scales, eagerly and replayed as CUDA graphs, under the switches a refinement
    enters on CUDA: (records, the given scales, the scales after each)."""
    handles, given, batches, reference, forward = stage_inputs(session, model, calib)
    records, scales = [], []
    with session.compilable():
        for graphed in (False, True):
            for handle, value in zip(handles, given):
                handle.set(value)
            records.append(gradient_refine(handles, forward, batches, reference, steps=STEPS, lr=LR, checks=STEPS,
                                           cuda_graph=graphed))
            scales.append([h.read() for h in handles])
            # the model's own forward at the scales the stage kept, for the record's best check to be compared with
            records[-1]["plain_loss_after"] = mean_fitness(forward, batches, reference, get_fitness("kl"), 0.1, True)
    return records, given, scales


# one step: the scales kept are then those after it in both runs (with more, each run keeps its best check, which
# need not be at the same step in both: their checks after steps differ, below)
STEPS, LR = 1, 0.01


def assert_same_stage(records, given, scales):
    eager, graphed = records
    assert not eager["cuda_graph"] and graphed["cuda_graph"]
    assert eager["kept"] and graphed["kept"]
    assert [c["step"] for c in graphed["history"]] == list(range(STEPS + 1))
    # the checks replayed as CUDA graphs: the eager forward's loss at the same (given) scales, and at the scales the
    # graphed stage kept, the loss of the model's own forward (history: rounded to 6 decimals)
    assert graphed["history"][0]["loss"] == pytest.approx(eager["history"][0]["loss"], abs=2e-6)
    assert graphed["loss_after"] == pytest.approx(graphed["plain_loss_after"], rel=1e-4)
    assert eager["loss_after"] == pytest.approx(eager["plain_loss_after"], rel=1e-4)
    # the same forward and backward kernels; Adam's update differs in rounding (capturable: its bias corrections
    # on the device, in fp32) and the backward's atomic reductions may too: an element whose gradient is near zero
    # can take its ±lr step either way, so the checks after steps are not compared: the calibration KL of torch.ao
    # models moves by up to 20 % when one activation scale moves by 2e-7 (FINDINGS section 19); the scales are
    start, after_eager, after_graphed = (torch.cat([t.float().flatten() for t in ts]) for ts in (given, *scales))
    # the replays moved the scales (a graph replaying stale inputs would leave them where they were), each by at
    # most Adam's steps
    moved = (after_graphed / start - 1).abs()
    assert (moved > LR / 10).float().mean() > 0.5 and moved.max() < math.exp(STEPS * LR * 1.5) - 1
    agree = ((after_graphed / after_eager - 1).abs() <= 1e-4).float().mean()
    assert agree >= 0.99, f"only {agree:.2%} of the scales agree with the eager stage's"


def test_graphed_fx_stage_equals_the_eager_one(tiny_vit, fmnist):
    from cptv_plugin.fx.refine import FxSession

    calib = fmnist[0]
    model = copy.deepcopy(tiny_vit).cuda()
    # 4-bit weights (at 3 bits the stage kept nothing in some runs; test_gradient.py says why not 2)
    session = FxSession(prepare_and_calibrate(tiny_vit, calib, "W4A8").cuda())
    assert_same_stage(*stage_twice(session, model, calib))


def test_graphed_modelopt_stage_equals_the_eager_one(tiny_vit, fmnist):
    pytest.importorskip("modelopt")
    calib = fmnist[0]
    model = copy.deepcopy(tiny_vit).cuda()
    assert_same_stage(*stage_twice(modelopt_session(model, calib), model, calib))


def test_graphed_stage_packing_every_batch_into_one_step(tiny_vit, fmnist):
    """``step_images``: one captured step over all calibration batches; its checks are the mean over the batches
    (the eager one-batch-per-step stage's start) and, after the step, the model's own forward at the kept scales.
    ModelOpt at W2A8, whose KL falls at once (torch.ao's W4A8 model from 1 % off kept nothing after one packed step
    at this rate on the H200: its first step moves every scale by ~1 %, across ties)."""
    pytest.importorskip("modelopt")
    calib = fmnist[0]
    model = copy.deepcopy(tiny_vit).cuda()
    session = modelopt_session(model, calib)
    handles, given, batches, reference, forward = stage_inputs(session, model, calib)
    with session.compilable():
        for handle, value in zip(handles, given):
            handle.set(value)
        start = mean_fitness(forward, batches, reference, get_fitness("kl"), 0.1, True)
        record = gradient_refine(handles, forward, batches, reference, steps=STEPS, lr=LR, checks=STEPS,
                                 cuda_graph=True, step_images=len(calib))
        assert record["cuda_graph"] and record["step_images"] == len(calib)
        assert record["history"][0]["loss"] == pytest.approx(start, abs=2e-6)
        assert record["kept"], record["history"]
        assert record["loss_after"] == pytest.approx(
            mean_fitness(forward, batches, reference, get_fitness("kl"), 0.1, True), rel=1e-4)
    moved = torch.cat([(h.read() / g - 1).abs().flatten() for h, g in zip(handles, given)])
    assert (moved > LR / 10).float().mean() > 0.5


def test_compiled_stage_on_cuda_moves_the_scales(tiny_vit, fmnist):
    """``gradient_cuda_graph=False`` compiles the stage. On an H200 with torch 2.11 its 20 steps moved nothing (KL
    0.030299 at every check, FINDINGS sections 39-40) though its compiled forward follows the learned scales:
    the stage now also checks that they get a gradient. Either the compiled stage trains, or it runs eagerly."""
    import cptv_plugin
    from cptv_plugin import SearchConfig

    calib = fmnist[0].cuda()
    config = SearchConfig(passes=0, population=1, cycles=0, samples=1, batch_size=50, progress=False,
                          search_outside_blocks=False, seed_candidates=(), start_candidates=(), gradient_steps=20,
                          gradient_checks=4, compile=True, gradient_cuda_graph=False,
                          gradient_grace=0)  # 20 steps: as this test ran before the default's grace (110 steps)
    prepared = prepare_and_calibrate(copy.deepcopy(tiny_vit).cuda(), calib, "W3A8")
    record = cptv_plugin.refine_fx(prepared, calib, config=config).gradient
    assert not record["cuda_graph"] and record["compiled"] != ("compile_fallback" in record)
    assert record["kept"] and len({check["loss"] for check in record["history"]}) > 1, record["history"]


def test_per_tensor_fake_quantize_with_mask_on_cuda_is_the_plain_arithmetic():
    """On CUDA the stage's per-tensor fake quant is torch's fused kernel: the values and the in-range mask of the
    plain ops (the CPU's path), bit for bit, with and without a zero point, also inside a captured CUDA graph."""
    from cptv_plugin.handles import affine_fake_quantize_with_mask

    inputs = torch.randn(4096, 97, generator=torch.Generator().manual_seed(0)) * 3
    for scale, zero_point in [(0.0371, torch.tensor([3])), (0.1, None), (0.02371, torch.tensor([-5]))]:
        scale = torch.tensor([scale])
        expected = affine_fake_quantize_with_mask(inputs, scale, zero_point, -128, 127, None)
        on_cuda = affine_fake_quantize_with_mask(inputs.cuda(), scale.cuda(), zero_point, -128, 127, None)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(on_cuda, expected))
        # what a captured step reads lives on the device already (a quantizer's buffers do)
        static, scale = inputs.cuda(), scale.cuda()
        zero_point = None if zero_point is None else zero_point.cuda()
        graph = torch.cuda.CUDAGraph()
        affine_fake_quantize_with_mask(static, scale, zero_point, -128, 127, None)  # warm-up
        with torch.cuda.graph(graph):
            captured = affine_fake_quantize_with_mask(static, scale, zero_point, -128, 127, None)
        graph.replay()
        assert all(torch.equal(a.cpu(), b) for a, b in zip(captured, expected))
