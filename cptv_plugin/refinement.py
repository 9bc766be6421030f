"""The one refinement flow every integration shares: validate, probe, reference outputs, search, commit.

An integration builds a *session* around the user's model (its scale handles, groups and a segmented
evaluation model) and hands it to :func:`run_refinement`. The flow is the same for torch.ao FX, PT2E,
ModelOpt and pytorch-quantization, so a user does not notice which framework they came from.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import time
from typing import Callable, Protocol

import torch
from torch import nn

from .config import SearchConfig
from .data import CalibrationError, calibration_images, split_batches
from .distributed import Shard
from .engine import (ONE_SEGMENT_NO_FEATURES, Evaluator, FeatureTerm, SegmentedModel, mean_fitness,
                     mean_fitness_with_features, reference_outputs)
from .fitness import get_fitness, needs_negatives
from .gradient import gradient_refine
from .handles import Group, set_groups
from .search import POOR_START_AGREEMENT, RefineResult, evolutionary_search
from .starts import start_vectors

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
    def prepare(self, images: torch.Tensor) -> None:
        """Last setup that needs example images (after they are checked to fit the model)."""
    def begin(self) -> None: ...
    def commit(self) -> None: ...
    def clip_weights(self, keep: bool = False) -> tuple[int, Callable[[], None] | None]:
        """Clip weights onto their grid at the current scales as ``commit`` will (how many moved; with ``keep``,
        the undo, ``None`` where nothing can move)."""
    def compilable(self) -> contextlib.AbstractContextManager[str | None]:
        """While it lasts, the model can be compiled usefully; yields why not (``None``: it can)."""


def device_of(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def run_refinement(session: RefinementSession, calib_data, config: SearchConfig,
                   fp_model: nn.Module | None = None) -> RefineResult:
    """Search ``session``'s groups on ``calib_data`` and commit the best scales into the user's model.

    On any failure (including Ctrl-C before the search starts) the model is restored as it was given.

    With several ranks (torch.distributed, ``config.distributed``) every rank calls this with the same model, images
    and config: the search's evaluations are shared out by calibration batch and summed, the gradient stage runs
    whole on every rank, and every rank commits the same scales.
    """
    started = time.time()
    config.validate()
    model_device = device_of(session.module)
    device = torch.device(config.device) if config.device else model_device
    if device.type == "cuda" and device.index is None:  # "cuda" names the current device: cuda:0 by default
        device = torch.device("cuda", torch.cuda.current_device())
    shard = Shard.for_run(config.distributed, model_device)
    state = session.snapshot()
    compiling = contextlib.ExitStack()  # what compiling switched in the model, undone before commit or restore
    with shard.quiet_followers():  # one log for the ranks, rank 0's
        try:
            min_batch, batches, held_out = _start(session, config, calib_data, device, model_device, shard)
            local = shard.batches(batches)  # this rank's share (every batch, with one rank)
            reference = _reference(session, fp_model, local)
            lossless = _lossless(session, config, local, reference, shard)
            if lossless is not None and lossless["skipped"]:
                result, precision = _unchanged(session, config, local, reference, lossless, shard), "fp32"
            else:
                result, precision = _search(session, config, device, batches, local, reference, held_out, fp_model,
                                            min_batch, compiling, shard)
                result.lossless = lossless
            result.device = _device_name(device)
            result.ranks = shard.world
            result.precision = precision
            result.compiled = session.chain.compiled_fraction
            _agree(session, shard)
            session.commit()
            result.seconds = time.time() - started  # everything the user waited for, the framework's analysis aside
        except BaseException:
            compiling.close()
            session.restore(state)
            raise
    return result


def _start(session: RefinementSession, config: SearchConfig, calib_data, device: torch.device,
           model_device: torch.device, shard: Shard) -> tuple[int, list[torch.Tensor], torch.Tensor | None]:
    """What :func:`_calibration` returns, once every rank has started with what rank 0 was given. A rank that
    refuses alone (wrong device, images its model cannot take) passes its error to the check, so every rank hears
    of it and none waits forever."""
    try:
        if device != model_device:
            raise ValueError(f"the model is on {model_device} but config.device is {device}: move the model "
                             f"first (model.to('{device}')) or leave config.device unset")
        min_batch, batches, held_out = _calibration(session, config, calib_data, device)
        session.begin()
        own = fingerprint(session, config, batches, ignored=RANK_SPECIFIC) if shard.active else ""
    except Exception as error:
        if not shard.active:
            raise
        own = error
    shard.check_same(own)
    return min_batch, batches, held_out


def _calibration(session: RefinementSession, config: SearchConfig, calib_data,
                 device: torch.device) -> tuple[int, list[torch.Tensor], torch.Tensor | None]:
    """The checked calibration images as ``(smallest batch the fitness takes, batches on device, held-out images or
    None)``; the first two images run through the model to check that they fit it."""
    min_batch = 2 if needs_negatives(config.fitness) else 1
    if config.batch_size < min_batch:
        raise CalibrationError(f"batch_size={config.batch_size} is too small: the fitness needs at least {min_batch}")
    images = calibration_images(calib_data, min_batch=min_batch)
    held_out = None
    if config.validation_fraction > 0:
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(config.seed))
        count = int(round(len(images) * config.validation_fraction))
        if count < min_batch or len(images) - count < min_batch:
            raise CalibrationError(
                f"validation_fraction={config.validation_fraction} of {len(images)} images leaves too few images "
                f"on one side (each needs at least {min_batch}): pass more images or change the fraction")
        held_out, images = images[order[:count]], images[order[count:]]
    batches = [b.to(device) for b in split_batches(images, config.batch_size, min_batch)]
    for size in (2, 3):  # two sizes: a model exported for a fixed batch of either is caught here, by name
        _probe(session, batches[0][:size])
    session.prepare(batches[0][:2])
    if len(images) < config.batch_size:
        split = " left after the validation split" if held_out is not None else ""
        raise CalibrationError(
            f"the calibration set has {len(images)} images{split}, fewer than batch_size={config.batch_size}: "
            f"pass at least {config.batch_size} images or set SearchConfig(batch_size={len(images)})")
    return min_batch, batches, held_out


def _search(session: RefinementSession, config: SearchConfig, device: torch.device, batches: list[torch.Tensor],
            local: list[torch.Tensor], reference: list[torch.Tensor], held_out: torch.Tensor | None,
            fp_model: nn.Module | None, min_batch: int, compiling: contextlib.ExitStack,
            shard: Shard) -> tuple[RefineResult, str]:
    """Start candidates, the evolutionary search, its guards and the gradient stage; returns the result and the
    precision the candidates were evaluated in. What compiling switches in the model is entered on ``compiling``
    (the caller undoes it before committing or restoring). ``batches``: every calibration batch; ``local`` and
    ``reference``: this rank's share and its full-precision outputs (every batch, with one rank)."""
    starts = _starts(session, batches, config.start_candidates, shard)
    obstacle = None
    compile_model = config.resolved_compile(device.type) and config.engine == "fast"
    if compile_model:
        obstacle = compiling.enter_context(session.compilable())
        if obstacle:  # a warning only where the user asked for it
            log = logger.warning if config.compile is True else logger.info
            log("compile=%s ignored: %s; the search runs eagerly", config.compile, obstacle)
        elif config.passes:  # without a search the few evaluations would wait for compiling for nothing
            # segments before the first searched group only fill the cache, once per pass: left eager
            session.chain.compile(start=min((g.segment for g in session.groups), default=0))
    precision = config.resolved_precision(device.type)
    if config.engine == "literal":
        precision = "fp32"  # the reference implementation: full forward, fp32, one fitness batch at a time
    evaluator = Evaluator(session.chain, local, reference, config.fitness, config.temperature,
                          config.normalize, compute_batch_size=config.resolved_compute_batch_size(device.type)
                          if config.engine == "fast" else None, precision=precision,
                          features=_feature_term(session, config, local), shard=shard)
    validator = None
    if held_out is not None:
        held_batches = shard.batches([b.to(device) for b in split_batches(held_out, config.batch_size, min_batch)],
                                     "held-out")
        validator = Evaluator(session.chain, held_batches, _reference(session, fp_model, held_batches),
                              config.fitness, config.temperature, config.normalize, precision=precision,
                              features=_feature_term(session, config, held_batches), shard=shard)
    with compiling:  # the gradient stage compiles the whole model under the same switches
        with _matmul_precision(precision):
            initial_validation = validator(None) if validator is not None else None
            initial_vectors = [g.read() for g in session.groups]
            # hashing the calibration images costs a device-to-host copy: only for checkpointed searches
            key = fingerprint(session, config, batches) if config.checkpoint_path else ""
            initial_agreement = evaluator.agreement()
            if not starts:  # else only if the search keeps the given scales as its start (below)
                _check_start(initial_agreement)
            per_pass = validator if validator is not None and config.validation_selection == "per_pass" else None
            result = evolutionary_search(session.groups, evaluator, config, fingerprint=key, starts=starts,
                                         given_agreement=initial_agreement,
                                         pass_judge=(lambda: per_pass(None)) if per_pass is not None else None)
            if starts and (result.start or {}).get("chosen", "given") == "given":
                _check_start(initial_agreement)
            result.initial_agreement = initial_agreement
            if config.agreement_guard:
                final_agreement = evaluator.agreement()
                restored = _guard(session, initial_vectors, result, final_agreement < initial_agreement,
                                  "the refined scales agree less often with the full-precision model's top-1 "
                                  f"({final_agreement:.4f} < {initial_agreement:.4f})")
                result.agreement = {"initial": initial_agreement, "final": final_agreement, "restored": restored}
            if validator is not None:
                final_validation = validator(None)
                restored = _guard(session, initial_vectors, result, final_validation > initial_validation,
                                  "the refined scales are worse on the held-out images "
                                  f"({final_validation:.5f} > {initial_validation:.5f})")
                result.validation = {**(result.validation or {}), "initial": initial_validation,
                                     "final": final_validation, "restored": restored, "images": len(held_out)}
        result.search_fitness = result.final_fitness
        if config.gradient_steps and not result.interrupted:
            # the stage runs whole on every rank (the same steps on every batch): it needs every batch's reference
            _gradient_stage(session, config, batches,
                            _reference(session, fp_model, batches) if shard.active else reference, result,
                            initial_vectors, shard, compile=compile_model and not obstacle,
                            measure=lambda: _search_fitness(session, config, local, reference, evaluator.features,
                                                            shard))
    return result, precision


def _agree(session: RefinementSession, shard: Shard) -> None:
    """With several ranks: every rank's scales made rank 0's where any differ (see :meth:`Shard.agree`)."""
    agreed = shard.agree([g.read() for g in session.groups])
    if agreed is not None:
        set_groups(session.groups, agreed)


def _lossless(session: RefinementSession, config: SearchConfig, batches: list[torch.Tensor],
              reference: list[torch.Tensor], shard: Shard) -> dict | None:
    """With ``config.lossless_kl``: the given scales' mean KL divergence from the full-precision outputs on the
    calibration images (eager, fp32) and whether it is below the threshold (``"skipped"``)."""
    if not config.lossless_kl:
        return None
    forward = functools.partial(session.chain.forward, eager=True)
    value = mean_fitness(forward, batches, reference, get_fitness("kl"), config.temperature, config.normalize,
                         shard=shard)
    skipped = value < config.lossless_kl
    if skipped:
        logger.warning("the quantized model already matches the full-precision one on the calibration images (mean "
                       "KL %.2g < lossless_kl=%g): its scales are left as they are; pass "
                       "SearchConfig(lossless_kl=0) to refine them anyway", value, config.lossless_kl)
    return {"kl": value, "threshold": config.lossless_kl, "skipped": skipped}


def _unchanged(session: RefinementSession, config: SearchConfig, batches: list[torch.Tensor],
               reference: list[torch.Tensor], lossless: dict, shard: Shard) -> RefineResult:
    """The result of a refinement that left the given scales as they are: their fitness (eager, fp32)."""
    fitness = _search_fitness(session, config, batches, reference, shard=shard)
    return RefineResult(initial_fitness=fitness, final_fitness=fitness, config=config,
                        groups={g.name: len(g) for g in session.groups}, lossless=lossless)


def _gradient_stage(session: RefinementSession, config: SearchConfig, batches: list[torch.Tensor],
                    reference: list[torch.Tensor], result: RefineResult, initial_vectors: list[torch.Tensor],
                    shard: Shard, measure: Callable[[], float], compile: bool = False) -> None:
    """Run :func:`~cptv_plugin.gradient.gradient_refine` on the searched scales, in fp32, on the eager chain
    (the stage replaces the quantizers' forwards, which the search's compiled copies would not see; ``compile``
    compiles that eager chain whole); ``measure()`` gives the search's fitness of the scales it kept. With several
    ranks each runs the whole stage and rank 0's outcome is every rank's (the same steps, but a GPU kernel that is
    not bit-reproducible can make a rank's check come out otherwise). Ctrl-C keeps the search's scales (or, with
    ``on_interrupt="restore"``, the given ones) and marks the result interrupted."""
    handles = [h for g in session.groups for h in g.handles]
    forward = functools.partial(session.chain.forward, eager=True)
    # gradient_clip_weights: the weights the commit clips, clipped at the searched scales (or at the first
    # overshoot), so that the stage learns scales for what will be converted (benchmarks/FINDINGS.md, section 39)
    undo_clips: list[Callable[[], None]] = []

    def clip_weights() -> int:
        # the originals kept wherever Ctrl-C may leave scales other than those the weights were clipped at: the
        # given ones, or the search's after a clip at the stage's best scales
        moved, undo = session.clip_weights(keep=config.on_interrupt == "restore"
                                           or config.gradient_clip_weights == "on_overshoot")
        if undo is not None:
            undo_clips.append(undo)
        return moved

    clipped = clip_weights() if config.gradient_clip_weights == "before" else None
    try:
        with contextlib.ExitStack() as switches:
            if config.gradient_cuda_graph and batches[0].is_cuda and not compile:
                # the quantizers' traceable fake quant (when compiling, the caller has entered it already): no
                # host-side checks in the step a CUDA graph captures
                switches.enter_context(session.compilable())
            result.gradient = gradient_refine(
                handles, forward, batches, reference,
                steps=config.gradient_steps, lr=config.gradient_lr, fitness=config.gradient_fitness,
                checks=config.gradient_checks, temperature=config.temperature, normalize=config.normalize,
                seed=config.seed, progress=config.progress and shard.leader, compile=compile,
                cuda_graph=config.gradient_cuda_graph, warmup=config.gradient_warmup,
                backtrack=config.gradient_backtrack, grace=config.gradient_grace,
                step_images=config.gradient_batch_size,
                clip_weights=clip_weights if config.gradient_clip_weights == "on_overshoot" else None)
    except KeyboardInterrupt:
        result.interrupted = True
        result.gradient = {"steps": config.gradient_steps, "interrupted": True}
        for undo in reversed(undo_clips):
            undo()
        if config.on_interrupt == "restore":
            logger.warning("gradient stage interrupted: restoring the initial scales (on_interrupt='restore')")
            set_groups(session.groups, initial_vectors)
            result.final_fitness = result.initial_fitness
        else:
            logger.warning("gradient stage interrupted: keeping the search's scales")
        return
    if clipped is not None:
        result.gradient["clipped_weights"] = clipped
    if shard.active:
        result.gradient = shard.from_leader(lambda: result.gradient)
        _agree(session, shard)
    if result.gradient["kept"]:
        result.final_fitness = measure()  # the search fitness of the committed scales (eager fp32, like the stage)


def _check_start(agreement: float) -> None:
    """Warn when the calibration we were given is so far off that a better start would end much higher."""
    if agreement < POOR_START_AGREEMENT:
        logger.warning(
            "the quantized model's top-1 agrees with the full-precision model's on only %.0f%% of the calibration "
            "images: its calibration is far off, and on the reference models the search ended 6 to 41 points "
            "higher from a better start (means of 3 seeds, benchmarks/FINDINGS.md, section 11). Consider "
            "refining a better calibration: torch.ao's HistogramObserver for activations, ModelOpt's algorithm "
            "'gptq' for 2-3-bit weights.", 100 * agreement)


def _guard(session: RefinementSession, initial_vectors: list[torch.Tensor], result: RefineResult, failed: bool,
           reason: str) -> bool:
    """A guard's verdict: when ``failed``, put the initial scales back (and say why); returns ``failed``."""
    if failed:
        logger.warning("%s: keeping the initial scales", reason)
        set_groups(session.groups, initial_vectors)
        result.final_fitness = result.initial_fitness
    return failed


def _reference(session: RefinementSession, fp_model: nn.Module | None, batches: list[torch.Tensor]):
    """Full-precision outputs (fp32): of ``fp_model`` if given, else of the model with quantization off, run
    eagerly: compiled segments share copies of blocks that do not follow quantization switched off."""
    if fp_model is not None:
        return reference_outputs(fp_model.eval(), batches)
    with _full_precision(session):
        return reference_outputs(functools.partial(session.chain.forward, eager=True), batches)


def _feature_term(session: RefinementSession, config: SearchConfig,
                  batches: list[torch.Tensor]) -> FeatureTerm | None:
    """With ``config.feature_weight``: the full-precision features before the head of ``batches`` (the model with
    its quantizers off, eager, fp32) and their weight in the fitness."""
    if not config.feature_weight:
        return None
    if session.chain.feature_segment is None:
        raise ValueError(ONE_SEGMENT_NO_FEATURES + " (the warning above says why it could not be traced)")
    with _full_precision(session), torch.no_grad():
        reference = [session.chain.forward_with_features(images, eager=True)[1] for images in batches]
    return FeatureTerm(weight=config.feature_weight, reference=reference)


def _search_fitness(session: RefinementSession, config: SearchConfig, batches: list[torch.Tensor],
                    reference: list[torch.Tensor], features: FeatureTerm | None = None,
                    shard: Shard | None = None) -> float:
    """The search's fitness of the current scales (eager, fp32, one plain forward per batch), its feature term
    included when ``config.feature_weight`` asks for one (``features``: its full-precision features of ``batches``
    where the caller has them already)."""
    fitness = get_fitness(config.fitness)
    features = features or _feature_term(session, config, batches)
    if features is not None:
        return mean_fitness_with_features(session.chain, batches, reference, fitness, config.temperature,
                                          config.normalize, features, shard=shard)
    forward = functools.partial(session.chain.forward, eager=True)
    return mean_fitness(forward, batches, reference, fitness, config.temperature, config.normalize, shard=shard)


@contextlib.contextmanager
def _full_precision(session: RefinementSession):
    """Every quantizer of ``session`` off while it lasts (its model is then the full-precision reference; run it
    eagerly: compiled segments share copies of blocks that do not follow the switch)."""
    session.set_quantization(False)
    try:
        yield
    finally:
        session.set_quantization(True)


# calibration images that data-driven start candidates see (their statistics settle well before)
START_IMAGES = 256


def _starts(session: RefinementSession, batches: list[torch.Tensor], names: tuple[str, ...], shard: Shard):
    """The start candidates ``names`` (name -> one vector per group), computed from the full-precision model on up
    to ``START_IMAGES`` calibration images, run eagerly (hooks do not fire in compiled copies); with several
    ranks, rank 0's."""
    if not names:
        return {}

    def run_full_precision() -> None:
        with _full_precision(session), torch.no_grad():
            seen = 0
            for batch in batches:
                if seen >= START_IMAGES:
                    break
                session.chain.forward(batch[:START_IMAGES - seen], eager=True)
                seen += len(batch)

    starts = start_vectors(session.groups, names, run_full_precision)
    flat = [vector for name in starts for vector in starts[name]]
    agreed = shard.agree(flat)
    if agreed is not None:
        agreed_iter = iter(agreed)
        starts = {name: [next(agreed_iter) for _ in vectors] for name, vectors in starts.items()}
    return starts


# settings that do not change a search's course: a checkpoint written with other values of them still fits
CHECKPOINT_INDEPENDENT = frozenset({
    "progress", "checkpoint_path", "device", "compile", "name", "on_interrupt", "agreement_guard", "lossless_kl",
    "gradient_cuda_graph", "gradient_warmup", "gradient_backtrack", "gradient_grace",
    "gradient_clip_weights", "gradient_batch_size", "distributed"})
# settings the ranks of one distributed refinement may hold differently (every other one steers collectives)
RANK_SPECIFIC = frozenset({"device", "progress"})


def fingerprint(session: RefinementSession, config: SearchConfig, batches: list[torch.Tensor],
                ignored: frozenset[str] = CHECKPOINT_INDEPENDENT) -> str:
    """What a search checkpoint must match: the quantizers (names, shapes, scales at the start), the search
    settings that change its course (all but ``ignored``), and the calibration images."""
    import dataclasses
    import hashlib

    digest = hashlib.sha256()
    for group in session.groups:
        digest.update(group.name.encode())
        for handle in group.handles:
            digest.update(f"{handle.name}:{handle.role}:{handle.quant_min}:{handle.quant_max}".encode())
            digest.update(handle.read().detach().cpu().float().numpy().tobytes())
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ignored}
    digest.update(repr(sorted(settings.items())).encode())
    for batch in batches:
        digest.update(batch.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


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


def is_fixed_batch_error(error: BaseException) -> bool:
    """Whether ``error`` is torch.export's guard on a batch size the graph was exported for (a model exported
    without ``dynamic_shapes``): its message names ``size()[0]`` or ``shape[0]``."""
    return re.search(r"size\(\)\[0\]|shape\[0\]", str(error)) is not None


def _probe(session: RefinementSession, images: torch.Tensor) -> None:
    """Run two calibration images through the full-precision evaluation model; a failure there means the
    images do not fit the model, which deserves a clearer message than the layer's own."""
    try:
        with _full_precision(session), torch.no_grad():
            session.chain.forward(images, eager=True)
    except (RuntimeError, ValueError, AssertionError) as error:
        if is_fixed_batch_error(error):
            raise CalibrationError(
                f"the model cannot run a batch of {len(images)} images: it was exported for a fixed batch size "
                f"({str(error).rstrip('. ')}). The search runs batches of other sizes: export with a dynamic batch "
                "dimension, torch.export.export(model, (images[:2],), "
                "dynamic_shapes=({0: torch.export.Dim('batch')},)), then prepare and calibrate again."
            ) from error
        raise CalibrationError(
            f"the model cannot run on calibration images of shape {tuple(images.shape[1:])}: "
            f"{str(error).rstrip('. ')}. "
            "Pass images shaped and normalized as for the model's own forward."
        ) from error
