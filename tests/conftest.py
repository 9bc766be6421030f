import copy
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)

import cptv_plugin  # noqa: E402
from cptv_plugin import SearchConfig  # noqa: E402
from cptv_plugin.datasets import calibration_subset, load_fashion_mnist  # noqa: E402
from cptv_plugin.models import load_reference_model  # noqa: E402
from cptv_plugin.qconfigs import fx_qconfig_mapping, prepare_timm_for_fx  # noqa: E402

# one thread per pytest-xdist worker (the CI machine has 2 cores, and `-n 2` runs two workers), else both
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def environment_with_this_package(**extra: str) -> dict:
    """``os.environ`` (and ``extra``) with the cptv_plugin these tests import first on ``PYTHONPATH``: a subprocess
    (torchrun's ranks, a worker script run by its path) then imports it too, not another installed version, nor
    nothing on a checkout that was not pip-installed."""
    root = str(Path(cptv_plugin.__file__).resolve().parents[1])
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


# a search small enough for CPU tests: 1 pass, P=4, C=2, S=2, no gradient stage (tests/test_gradient.py has its own),
# no lossless check (the CI models at 8 bits may pass it; tests/test_lossless.py covers it) and no activation start
# (a grid search per quantizer, tests/test_starts.py covers it: with it a refinement of the CI ViT took 4.8 s on
# 100 images, without 1.6 s; since session 41 about 2.7 s against 1.9 s)
TINY_SEARCH = SearchConfig(passes=1, population=4, cycles=2, samples=2, batch_size=50, progress=False,
                           gradient_steps=0, lossless_kl=0.0, start_candidates=())


@pytest.fixture(scope="session")
def fmnist():
    """(calibration images, test images, test labels) from the real Fashion-MNIST files."""
    train_x, _ = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    return calibration_subset(train_x, 200, seed=0), test_x[:500], test_y[:500]


@pytest.fixture(scope="session")
def tiny_vit():
    """The project's trained 4-block ViT (float32, eval mode, attention unfused for FX)."""
    return prepare_timm_for_fx(load_reference_model("fmnist_vit_tiny"))


def prepare_and_calibrate(model, calib, bits="W4A8", qconfig_mapping=None, qat=False):
    from torch.ao.quantization.quantize_fx import prepare_fx, prepare_qat_fx

    mapping = qconfig_mapping or fx_qconfig_mapping(bits, qat=qat)
    model = copy.deepcopy(model)
    if qat:
        prepared = prepare_qat_fx(model.train(), mapping, example_inputs=(calib[:1],)).eval()
    else:
        prepared = prepare_fx(model.eval(), mapping, example_inputs=(calib[:1],))
    with torch.no_grad():
        for batch in calib.split(100):
            prepared(batch)
    return prepared


def modelopt_quantize(model, calib, bits=(4, 8)):
    """A copy of ``model`` quantized by ModelOpt at W{bits[0]}A{bits[1]} and calibrated on ``calib``; the test skips
    where ModelOpt is missing (the device: the FX cases run there without it)."""
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from cptv_plugin.qconfigs import modelopt_config

    weight_bits, activation_bits = bits
    return mtq.quantize(copy.deepcopy(model), modelopt_config(f"W{weight_bits}A{activation_bits}"), lambda m: m(calib))


def first_output(output):
    """Exported (PT2E) graphs return a tuple of outputs; eager models the tensor itself."""
    return output[0] if isinstance(output, (tuple, list)) else output


def assert_suffix_matches_full(chain, groups, images, full=None):
    """From every group's cached segment input, the rest of the model gives the full forward's output."""
    with torch.no_grad():
        full = first_output(chain.forward(images)) if full is None else full
        for group in groups:
            env = chain.run(chain.initial_env(images), 0, group.segment)
            torch.testing.assert_close(first_output(chain.run(env, group.segment)), full, rtol=0, atol=1e-5)


def onnxruntime_logits(path, images: torch.Tensor) -> np.ndarray:
    """What onnxruntime computes from the ONNX file at ``path`` on ``images``, with the graph as written (no graph
    optimizations: the Q/DQ nodes TensorRT would read run as they are)."""
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})[0]
