"""The one refinement flow every integration shares: validate, probe, reference outputs, search, commit.

An integration builds a *session* around the user's model (its scale handles, groups and a segmented
evaluation model) and hands it to :func:`run_refinement`. The flow is the same for torch.ao FX, PT2E,
ModelOpt and pytorch-quantization, so a user does not notice which framework they came from.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Protocol

import torch
from torch import nn

from .config import SearchConfig
from .data import CalibrationError, calibration_batches
from .engine import Evaluator, SegmentedModel, reference_outputs
from .fitness import needs_negatives
from .handles import Group
from .search import RefineResult, evolutionary_search

__all__ = ["RefinementSession", "run_refinement", "device_of"]

logger = logging.getLogger(__name__)


class RefinementSession(Protocol):
    """What an integration provides (see ``fx.refine.FxSession`` and ``amax.session.AmaxSession``)."""

    module: nn.Module  # the user's model
    groups: list[Group]
    chain: SegmentedModel

    def set_quantization(self, enabled: bool) -> None: ...
    def snapshot(self) -> dict: ...
    def restore(self, state: dict) -> None: ...
    def begin(self) -> None: ...
    def commit(self) -> None: ...


def device_of(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def run_refinement(session: RefinementSession, calib_data, config: SearchConfig,
                   fp_model: nn.Module | None = None) -> RefineResult:
    """Search ``session``'s groups on ``calib_data`` and commit the best scales into the user's model.

    On any failure (including Ctrl-C before the search starts) the model is restored as it was given.
    """
    config.validate()
    model_device = device_of(session.module)
    device = torch.device(config.device) if config.device else model_device
    if device != model_device:
        raise ValueError(f"the model is on {model_device} but config.device is {device}: move the model first "
                         f"(model.to('{device}')) or leave config.device unset")
    state = session.snapshot()
    try:
        batches = [b.to(device) for b in calibration_batches(
            calib_data, config.batch_size, min_batch=2 if needs_negatives(config.fitness) else 1)]
        _probe(session, batches[0][:2])
        session.begin()
        if fp_model is not None:
            reference = reference_outputs(fp_model.eval(), batches)
        else:
            session.set_quantization(False)
            try:
                reference = reference_outputs(session.chain.forward, batches)
            finally:
                session.set_quantization(True)
        if config.compile and config.engine == "fast":
            session.chain.compile()
        precision = config.resolved_precision(device.type)
        if config.engine == "literal":
            precision = "fp32"  # the reference implementation: full forward, fp32, one fitness batch at a time
        evaluator = Evaluator(session.chain, batches, reference, config.fitness, config.temperature,
                              config.normalize, compute_batch_size=config.resolved_compute_batch_size(device.type)
                              if config.engine == "fast" else None, precision=precision)
        with _matmul_precision(precision):
            result = evolutionary_search(session.groups, evaluator, config)
        result.device = _device_name(device)
        result.precision = precision
        session.commit()
    except BaseException:
        session.restore(state)
        raise
    return result


@contextlib.contextmanager
def _matmul_precision(precision: str):
    """TF32 matmuls and convolutions on CUDA for ``"tf32"``; restored afterwards."""
    if precision != "tf32" or not torch.cuda.is_available():
        yield
        return
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def _probe(session: RefinementSession, images: torch.Tensor) -> None:
    """Run two calibration images through the full-precision evaluation model; a failure there means the
    images do not fit the model, which deserves a clearer message than the layer's own."""
    session.set_quantization(False)
    try:
        with torch.no_grad():
            session.chain.forward(images)
    except (RuntimeError, ValueError, AssertionError) as error:
        raise CalibrationError(
            f"the model cannot run on calibration images of shape {tuple(images.shape[1:])}: {error}. "
            "Pass images shaped and normalized as for the model's own forward."
        ) from error
    finally:
        session.set_quantization(True)
