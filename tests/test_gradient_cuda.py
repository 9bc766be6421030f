"""The gradient stage's step replayed as a CUDA graph (``SearchConfig.gradient_cuda_graph``): the eager step's
arithmetic. CUDA only (CI has no GPU): on the device, ``python3 -m pytest -q tests/test_gradient_cuda.py``."""

import copy
import functools

import pytest
import torch

from cptv_plugin.gradient import gradient_refine
from conftest import prepare_and_calibrate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def stage_twice(session, model, calib):
    """The stage from the same scales, eagerly and replayed as CUDA graphs, under the switches a refinement
    enters on CUDA: (records, scales after each)."""
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
            records.append(gradient_refine(handles, forward, batches, reference, steps=40, lr=0.01, checks=4,
                                           cuda_graph=graphed))
            scales.append([h.read() for h in handles])
    return records, scales


def assert_same_stage(records, scales):
    eager, graphed = records
    assert not eager["cuda_graph"] and graphed["cuda_graph"]
    assert eager["kept"] and eager["loss_after"] < 0.9 * eager["loss_before"]
    # the same kernels in the same order; only the backward's atomic reductions may round differently
    for first, second in zip(eager["history"], graphed["history"]):
        assert second["loss"] == pytest.approx(first["loss"], rel=1e-3)
    for first, second in zip(*scales):
        torch.testing.assert_close(second, first, rtol=1e-3, atol=1e-7)


def test_graphed_fx_stage_equals_the_eager_one(tiny_vit, fmnist):
    from cptv_plugin.fx.refine import FxSession

    calib = fmnist[0]
    model = copy.deepcopy(tiny_vit).cuda()
    session = FxSession(prepare_and_calibrate(tiny_vit, calib, "W2A8").cuda())
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
