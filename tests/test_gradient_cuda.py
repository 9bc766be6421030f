"""The gradient stage's step replayed as a CUDA graph (``SearchConfig.gradient_cuda_graph``): the eager step's
arithmetic. CUDA only (CI has no GPU): on the device, ``python3 -m pytest -q tests/test_gradient_cuda.py``."""

import copy
import functools
import math

import pytest
import torch

from cptv_plugin.gradient import gradient_refine
from conftest import prepare_and_calibrate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def stage_twice(session, model, calib):
    """The stage from the same scales, eagerly and replayed as CUDA graphs, under the switches a refinement
    enters on CUDA: (records, the given scales, the scales after each)."""
    handles = [h for g in session.groups for h in g.handles]
    given = [h.read() for h in handles]
    batches = list(calib.cuda().split(50))
    with torch.no_grad():
        reference = [model(b) for b in batches]
    forward = functools.partial(session.chain.forward, eager=True)
    records, scales = [], []
    with session.compilable():
        for graphed in (False, True):
            for handle, value in zip(handles, given):
                handle.set(value)
            records.append(gradient_refine(handles, forward, batches, reference, steps=STEPS, lr=LR, checks=STEPS,
                                           cuda_graph=graphed))
            scales.append([h.read() for h in handles])
    return records, given, scales


STEPS, LR = 2, 0.01


def assert_same_stage(records, given, scales):
    eager, graphed = records
    assert not eager["cuda_graph"] and graphed["cuda_graph"]
    assert eager["kept"] and graphed["kept"]
    assert [c["step"] for c in graphed["history"]] == list(range(STEPS + 1))
    # the same forward and backward kernels; Adam's update differs in rounding (capturable: its bias corrections
    # on the device, in fp32) and the backward's atomic reductions may too. Two steps only: an element whose
    # gradient is near zero can take its ±lr step either way, and rounding steps flip with the scales, so
    # longer runs drift apart (on an H100: 3 steps 0.12 % apart at a check, 5 steps one scale 0.56 %, 40 steps 3 %)
    for first, second in zip(eager["history"], graphed["history"]):
        assert second["loss"] == pytest.approx(first["loss"], rel=2e-3)
    start, after_eager, after_graphed = (torch.cat([t.float().flatten() for t in ts]) for ts in (given, *scales))
    # the replays moved the scales (a graph replaying stale inputs would leave them where they were), each by at
    # most Adam's two steps
    moved = (after_graphed / start - 1).abs()
    assert (moved > LR / 10).float().mean() > 0.5 and moved.max() < math.exp(STEPS * LR * 1.5) - 1
    agree = ((after_graphed / after_eager - 1).abs() <= 1e-4).float().mean()
    assert agree >= 0.99, f"only {agree:.2%} of the scales agree with the eager stage's"


def test_graphed_fx_stage_equals_the_eager_one(tiny_vit, fmnist):
    from cptv_plugin.fx.refine import FxSession

    calib = fmnist[0]
    model = copy.deepcopy(tiny_vit).cuda()
    session = FxSession(prepare_and_calibrate(tiny_vit, calib, "W3A8").cuda())  # why not W2A8: test_gradient.py
    assert_same_stage(*stage_twice(session, model, calib))


def test_graphed_modelopt_stage_equals_the_eager_one(tiny_vit, fmnist):
    pytest.importorskip("modelopt")
    from benchmarks.accuracy import quantize_linear
    from cptv_plugin.amax.modelopt import modelopt_kind
    from cptv_plugin.amax.session import AmaxSession

    calib = fmnist[0]
    model = copy.deepcopy(tiny_vit).cuda()
    session = AmaxSession(quantize_linear(copy.deepcopy(model), calib.cuda(), "W2A8", "baseline"), modelopt_kind())
    assert_same_stage(*stage_twice(session, model, calib))
