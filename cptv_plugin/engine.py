"""Evaluation engine: full-precision outputs once, cached group inputs, suffix-only candidate evaluation.

A model is a chain of *segments* (callables from named values to named values). The search of a group
whose scales first act in segment ``s`` caches, once per visit, the values that flow into segment ``s`` for
every calibration batch, then evaluates each candidate by running only segments ``s…`` (DESIGN.md).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .distributed import Shard
from .fitness import get_fitness, infonce, infonce_batches

__all__ = ["Segment", "SegmentedModel", "Evaluator", "FeatureTerm", "ModelOutputError"]

logger = logging.getLogger(__name__)


ONE_SEGMENT_NO_FEATURES = ("the model runs as one segment (it could not be cut between blocks): it has no features "
                           "before the head to score; set SearchConfig(feature_weight=0)")


class ModelOutputError(RuntimeError):
    """The model produced something the fitness cannot use (NaN/Inf, or not a tensor)."""


@dataclass
class Segment:
    """``fn(*[env[name] for name in inputs])`` returns the values named ``outputs`` (a tuple), or the model's
    output when ``outputs`` is ``None`` (the last segment). ``compilable``: whether :meth:`SegmentedModel.compile`
    may compile it (not a segment that patches the model's modules while it runs)."""

    fn: Callable[..., Any]
    inputs: list[str]
    outputs: list[str] | None
    compilable: bool = True


class SegmentedModel:
    """An ordered chain of segments; ``initial_env(images)`` names the model inputs. ``feature_names``: the values
    entering the last segment that are the features before the head (``None``: every one with a batch dimension)."""

    def __init__(self, segments: list[Segment], initial_env: Callable[[torch.Tensor], dict[str, Any]],
                 feature_names: list[str] | None = None):
        if not segments or segments[-1].outputs is not None:
            raise ValueError("the last segment must return the model output (outputs=None)")
        self.segments = segments
        self.initial_env = initial_env
        self.feature_names = feature_names
        self._compile_start: int | None = None  # set by compile: the first segment it was asked to compile
        # live[s]: names produced before segment s (model inputs count as produced at -1) and read by
        # segment s or later: exactly what a cache of segment s's inputs must hold
        produced_by = {name: k for k, seg in enumerate(segments) for name in (seg.outputs or [])}
        self.live: list[set[str]] = []
        for s in range(len(segments)):
            needed = set().union(*(seg.inputs for seg in segments[s:]))
            self.live.append({name for name in needed if produced_by.get(name, -1) < s})

    def run(self, env: dict[str, Any], start: int = 0, stop: int | None = None, eager: bool = False) -> Any:
        """Run segments ``start…stop-1`` on ``env``; return the model output, or the live env at ``stop``.
        ``eager``: bypass compiled segments (their shared copies do not follow switches such as quantization off)."""
        stop = len(self.segments) if stop is None else stop
        env = dict(env)
        for index in range(start, stop):
            segment = self.segments[index]
            fn = segment.fn.eager if eager and isinstance(segment.fn, _CompiledOrEager) else segment.fn
            result = fn(*[env[name] for name in segment.inputs])
            if segment.outputs is None:
                return result
            if len(segment.outputs) == 1 and not isinstance(result, tuple):
                result = (result,)
            env.update(zip(segment.outputs, result))
        return {name: env[name] for name in self.live[stop]} if stop < len(self.segments) else env

    def forward(self, images: torch.Tensor, eager: bool = False) -> Any:
        return self.run(self.initial_env(images), eager=eager)

    @property
    def feature_segment(self) -> int | None:
        """The segment whose inputs are the features before the head (the last one); ``None`` for a model that
        is one segment, whose inputs are the images."""
        return len(self.segments) - 1 if len(self.segments) > 1 else None

    def features(self, env: dict[str, Any]) -> torch.Tensor:
        """The features before the head in ``env`` (the live values at :attr:`feature_segment`, or those named by
        ``feature_names``): every tensor among them that has a batch dimension, flattened per image and concatenated
        in name order."""
        live = self.feature_names or self.live[len(self.segments) - 1]
        tensors = [env[name] for name in sorted(live) if isinstance(env[name], torch.Tensor) and env[name].dim() > 1]
        if not tensors:
            raise ModelOutputError("nothing with a batch dimension enters the model's last segment: no features "
                                   "before the head to score; set SearchConfig(feature_weight=0)")
        return torch.cat([t.float().flatten(1) for t in tensors], dim=1)

    def forward_with_features(self, images: torch.Tensor, eager: bool = False) -> tuple[Any, torch.Tensor]:
        """The model output and the features before the head (:meth:`features`) of ``images``."""
        if self.feature_segment is None:
            raise ValueError(ONE_SEGMENT_NO_FEATURES)
        env = self.run(self.initial_env(images), 0, self.feature_segment, eager=eager)
        return self.run(env, self.feature_segment, eager=eager), self.features(env)

    @property
    def compiled_fraction(self) -> float:
        """Share of the segments given to ``compile`` that run compiled (0 before ``compile``; lower when
        compiling one failed)."""
        wanted = self.segments[self._compile_start:] if self._compile_start is not None else self.segments
        compiled = [s for s in wanted if isinstance(s.fn, _CompiledOrEager) and not s.fn.failed]
        return len(compiled) / len(wanted)

    def compile(self, start: int = 0, **options) -> int:
        """Compile segments ``start…`` with ``torch.compile`` (fake quantization fuses into its neighbours'
        kernels). Worth it on a GPU for long searches; each graph compiles on its first call. Segments before
        ``start`` stay eager: a search whose first group acts in segment ``start`` runs them only to fill its
        cache, once per pass, and compiling one costs seconds (the patch embedding of ViT-B/16: 5.5 s on an H100).

        Segments with the same structure (the blocks of a ViT) share one compiled copy, whose tensors are refreshed
        from the calling segment's own before each call: tracing is paid once per distinct block, not per block.
        Segments that are not ``compilable`` stay eager. Returns the number of distinct compiled graphs."""
        from torch import fx

        from .fx.structure import segment_structure

        self._compile_start = start
        options = options or COMPILE_OPTIONS
        shared: dict[str, tuple[list[torch.Tensor], Callable[..., Any]]] = {}
        for segment in self.segments[start:]:
            if not segment.compilable:
                continue
            eager = segment.fn
            structure = segment_structure(eager) if isinstance(eager, fx.GraphModule) else None
            if structure is None:
                segment.fn = _CompiledOrEager(torch.compile(eager, dynamic=False, **options), eager)
                continue
            key, tensors = structure
            if key not in shared:
                template = copy.deepcopy(eager)
                shared[key] = (segment_structure(template)[1], torch.compile(template, dynamic=False, **options))
            template_tensors, compiled = shared[key]
            segment.fn = _CompiledOrEager(_SharedCompiled(compiled, template_tensors, tensors), eager)
        compiling = [s for s in self.segments[start:] if s.compilable]
        distinct = len(shared) + sum(not isinstance(s.fn.compiled, _SharedCompiled) for s in compiling)
        logger.info("compiling %d segments as %d distinct graphs%s", len(compiling), distinct,
                    f" ({len(self.segments) - start - len(compiling)} are not compilable and stay eager)"
                    if len(compiling) < len(self.segments) - start else "")
        return distinct


# inductor: no benchmarking of pointwise kernel configs on first call (DeiT-T on an H100: 4.0 instead of 5.2 s per
# block graph, plus ~3 s once; same kernel time)
COMPILE_OPTIONS = {"options": {"triton.autotune_pointwise": False}}


class _CompiledOrEager:
    """A compiled segment that falls back to its eager self when torch.compile fails on it (an internal dynamo
    error on some torch/framework combinations: torch 2.11 on ModelOpt's dynamic modules): slower, still right."""

    def __init__(self, compiled: Callable[..., Any], eager: Callable[..., Any]):
        self.compiled, self.eager, self.failed = compiled, eager, False

    def __call__(self, *args: Any) -> Any:
        if not self.failed:
            try:
                return self.compiled(*args)
            except torch._dynamo.exc.TorchDynamoException as error:
                self.failed = True
                reason = " ".join(line.strip() for line in str(error).splitlines()[:3] if line.strip())
                logger.warning("torch.compile failed on a segment (torch %s: %s: %s); it runs eagerly",
                               torch.__version__, type(error).__name__, reason[:300])
        return self.eager(*args)


class _SharedCompiled:
    """One segment run through a compiled copy of a structurally identical segment (see ``compile``)."""

    def __init__(self, compiled: Callable[..., Any], template_tensors: list[torch.Tensor],
                 tensors: list[torch.Tensor]):
        self.compiled = compiled
        self.template_tensors = template_tensors
        self.tensors = tensors

    def __call__(self, *args: Any) -> Any:
        with torch.no_grad():  # the current scales and weights of this segment (one multi-tensor copy kernel)
            torch._foreach_copy_(self.template_tensors, self.tensors)
        return self.compiled(*args)


@dataclass
class FeatureTerm:
    """A second InfoNCE term of the fitness, on the features before the head: ``weight`` times the InfoNCE of the
    quantized features against ``reference`` (the full-precision features of each calibration batch)."""

    weight: float
    reference: list[torch.Tensor]


def _as_output_tensor(output: Any) -> torch.Tensor:
    """The model's output as one tensor: itself, the first of a tuple/list, or the ``logits`` of a mapping (Hugging
    Face's ``ImageClassifierOutput``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    raise ModelOutputError(f"the model returned {type(output).__name__}; the fitness needs a tensor of outputs (or a "
                           "tuple, or a mapping with 'logits'): wrap the model so that it returns its logits")


class Evaluator:
    """Computes the global fitness of the model's current scales over the calibration batches.

    Fitness batches (``batches``, e.g. 100 images: for InfoNCE the negatives) are grouped into forward passes
    of up to ``compute_batch_size`` images; each pass's output is split back into its fitness batches. The
    inputs of the segment being searched are cached per pass (:meth:`prepare` / :meth:`advance`), so a candidate
    runs only the segments from there on. ``precision`` is ``"fp32"``, ``"tf32"``, ``"bf16"`` or ``"fp16"``.
    ``features``: add an InfoNCE term on the features before the head (the last segment's inputs).
    ``shard``: with several ranks, ``batches`` are this rank's share and every fitness read (:meth:`collect`) and
    agreement is summed over the ranks: the fitness of the whole calibration set.
    """

    def __init__(self, model: SegmentedModel, batches: list[torch.Tensor], reference_outputs: list[torch.Tensor],
                 fitness: str, temperature: float, normalize: bool, compute_batch_size: int | None = None,
                 precision: str = "fp32", features: FeatureTerm | None = None, shard: Shard | None = None):
        if features is not None and model.feature_segment is None:
            raise ValueError(ONE_SEGMENT_NO_FEATURES)
        self.model = model
        self.sizes = [len(b) for b in batches]  # the batches themselves live on in the (concatenated) passes
        self.shard = shard or Shard()
        # what a rank's summed fitness is divided by: the images of every rank
        self.total_images = (int(self.shard.sum(torch.tensor(sum(self.sizes), dtype=torch.float64)))
                             if self.shard.active else sum(self.sizes))
        self.reference = reference_outputs
        self.fitness_fn = get_fitness(fitness)
        self.fitness_kwargs = {"temperature": temperature, "normalize": normalize}
        self.evaluations = 0
        self.precision = precision
        self.passes = _group_batches([len(b) for b in batches], compute_batch_size)
        self._inputs = [torch.cat([batches[i] for i in members]) if len(members) > 1 else batches[members[0]]
                        for members in self.passes]
        self._cache_segment: int | None = None
        self._cache: list[dict[str, Any]] = []
        self._stacked: dict[int, torch.Tensor | None] = {}
        self.features = features
        self._feature_reference = None if features is None else [
            F.normalize(torch.stack([features.reference[m].float().reshape(self.sizes[m], -1) for m in members]),
                        dim=-1)
            if len({self.sizes[m] for m in members}) == 1 else None for members in self.passes]

    def invalidate(self) -> None:
        """Forget cached segment inputs (call after scales of an earlier segment changed)."""
        self._cache_segment = None
        self._cache = []

    def _context(self):
        device_type = self._inputs[0].device.type
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(device_type, dtype=dtype)
        return contextlib.nullcontext()

    @torch.no_grad()
    def prepare(self, segment: int) -> None:
        """Cache the inputs of ``segment`` for every forward pass under the current scales."""
        if self._cache_segment == segment:
            return
        with self._context():
            if segment == 0:
                self._cache = [self.model.initial_env(images) for images in self._inputs]
            else:
                self._cache = [self.model.run(self.model.initial_env(images), 0, segment) for images in self._inputs]
        self._cache_segment = segment

    @torch.no_grad()
    def advance(self, segment: int) -> None:
        """Move a cache of segment ``k`` inputs to segment ``segment`` (``> k``) by running the segments between."""
        if self._cache_segment is None or segment < self._cache_segment:
            self.prepare(segment)
            return
        if segment > self._cache_segment:
            with self._context():
                self._cache = [self.model.run(env, self._cache_segment, segment) for env in self._cache]
            self._cache_segment = segment

    @torch.no_grad()
    def __call__(self, segment: int | None = None) -> float:
        """Fitness of the current scales, re-running segments ``segment…`` from the cache (``None``: all)."""
        return self.collect([self.queue(segment)])[0]

    @torch.no_grad()
    def queue(self, segment: int | None = None) -> torch.Tensor:
        """Like calling the evaluator, but the fitness stays on the device (a float64 scalar): nothing waits for
        the device, so evaluations queued back to back keep it busy while the host prepares the next one. The
        scales may change right after; work queued before runs with the scales it was queued with (stream
        order). Read the values with :meth:`collect`."""
        if segment is not None:
            self.advance(segment)
        total = torch.zeros((), dtype=torch.float64, device=self._inputs[0].device)
        for index, output, features in self._pass_outputs(segment, with_features=self.features is not None):
            total += self._pass_fitness(index, output)
            if features is not None:
                total += self._pass_feature_fitness(index, features)
        self.evaluations += 1
        return total / self.total_images

    def collect(self, queued: list[torch.Tensor]) -> list[float]:
        """The values of queued fitnesses (one device sync for all; with several ranks, one all-reduce that sums
        their shares); raises if one is NaN or infinite."""
        values = self.shard.sum(torch.stack(queued)).tolist() if queued else []
        if any(not math.isfinite(value) for value in values):
            raise ModelOutputError("the fitness is NaN or infinite: the quantized model's outputs are not finite")
        return values

    def _pass_fitness(self, index: int, output: torch.Tensor) -> torch.Tensor:
        """Sum over the images of one forward pass of their fitness batch's fitness (float64 scalar)."""
        members = self.passes[index]
        stacked = self._stacked_reference(index)
        if stacked is not None:  # InfoNCE of equal batches: all at once, a handful of kernels per pass
            size = self.sizes[members[0]]
            losses = infonce_batches(output.reshape(len(members), size, -1), stacked, reference_normalized=True,
                                     **self.fitness_kwargs)
            return losses.double().sum() * size
        total = torch.zeros((), dtype=torch.float64, device=output.device)
        offset = 0
        for member in members:
            size = self.sizes[member]
            value = self.fitness_fn(output[offset:offset + size], self.reference[member], **self.fitness_kwargs)
            total += value.double() * size
            offset += size
        return total

    def _pass_feature_fitness(self, index: int, features: torch.Tensor) -> torch.Tensor:
        """``features.weight`` times the summed InfoNCE of one forward pass's features (float64 scalar)."""
        members, stacked = self.passes[index], self._feature_reference[index]
        if stacked is not None:
            size = self.sizes[members[0]]
            losses = infonce_batches(features.reshape(len(members), size, -1), stacked, reference_normalized=True,
                                     temperature=self.fitness_kwargs["temperature"])
            total = losses.double().sum() * size
        else:
            total, offset = torch.zeros((), dtype=torch.float64, device=features.device), 0
            for member in members:
                size = self.sizes[member]
                total += infonce(features[offset:offset + size], self.features.reference[member],
                                 temperature=self.fitness_kwargs["temperature"]).double() * size
                offset += size
        return total * self.features.weight

    def _stacked_reference(self, index: int) -> torch.Tensor | None:
        """The references of a pass as one (batches, batch size, features) tensor, normalized as InfoNCE
        normalizes them; ``None`` where the batched path does not apply (another fitness, unequal batches)."""
        if index not in self._stacked:
            members = self.passes[index]
            stacked = None
            if self.fitness_fn is infonce and len({self.sizes[m] for m in members}) == 1:
                stacked = torch.stack([self.reference[m].float().reshape(self.sizes[m], -1) for m in members])
                if self.fitness_kwargs["normalize"]:
                    stacked = F.normalize(stacked, dim=-1)
            self._stacked[index] = stacked
        return self._stacked[index]

    @torch.no_grad()
    def agreement(self) -> float:
        """Share of the calibration images on which the current model's top-1 class (argmax of the output)
        equals the full-precision model's. A full forward; not counted as a fitness evaluation."""
        agreeing, count = 0, 0
        for output, reference in self._outputs():
            agreeing += int((output.flatten(1).argmax(1) == reference.flatten(1).argmax(1)).sum())
            count += len(output)
        if self.shard.active:
            agreeing, count = self.shard.sum(torch.tensor([agreeing, count], dtype=torch.float64)).tolist()
        return agreeing / count

    def _pass_outputs(self, segment: int | None, with_features: bool = False):
        """``(pass index, output, features)`` per forward pass: the model run from ``segment``'s cached inputs
        (``None``: from the images), in fp32; ``features`` before the head only ``with_features`` (else ``None``)."""
        start = 0 if segment is None else segment
        cut = self.model.feature_segment if with_features else None
        for index in range(len(self.passes)):
            env = self._cache[index] if segment is not None else self.model.initial_env(self._inputs[index])
            features = None
            with self._context():
                if cut is not None:
                    if start < cut:
                        env = self.model.run(env, start, cut)
                    features = self.model.features(env)
                    start_here = max(start, cut)
                else:
                    start_here = start
                output = _as_output_tensor(self.model.run(env, start_here))
            yield index, output.float(), features

    def _outputs(self):
        """``(output, reference)`` per fitness batch of a full forward: each pass's output split into its batches."""
        for index, output, _ in self._pass_outputs(None):
            offset = 0
            for member in self.passes[index]:
                size = self.sizes[member]
                yield output[offset:offset + size], self.reference[member]
                offset += size


def _group_batches(sizes: list[int], limit: int | None) -> list[list[int]]:
    """Consecutive fitness batches packed into forward passes of at most ``limit`` images (at least one each)."""
    passes: list[list[int]] = []
    filled = 0
    for index, size in enumerate(sizes):
        if passes and limit is not None and filled + size <= limit:
            passes[-1].append(index)
            filled += size
        else:
            passes.append([index])
            filled = size
    return passes


@torch.no_grad()
def reference_outputs(forward: Callable[[torch.Tensor], Any], batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Full-precision outputs, computed once per calibration set, checked for NaN/Inf."""
    outputs = []
    for images in batches:
        output = _as_output_tensor(forward(images)).detach()
        if not bool(torch.isfinite(output).all()):
            raise ModelOutputError("the full-precision model produced NaN or Inf on the calibration images")
        outputs.append(output)
    return outputs


def batch_fitness(forward: Callable[[torch.Tensor], Any], images: torch.Tensor, reference: torch.Tensor,
                  fitness: Callable, temperature: float, normalize: bool) -> torch.Tensor:
    """``fitness`` of ``forward(images)`` against their ``reference`` outputs, in fp32 (keeps the graph when
    gradients are recorded)."""
    return fitness(_as_output_tensor(forward(images)).float(), reference.float(), temperature=temperature,
                   normalize=normalize)


def mean_fitness(forward: Callable[[torch.Tensor], Any], batches: list[torch.Tensor], reference: list[torch.Tensor],
                 fitness: Callable, temperature: float, normalize: bool, record_gradients: bool = False,
                 shard: Shard | None = None) -> float:
    """The mean of :func:`batch_fitness` over the calibration batches (one plain forward each, no grouping or
    cache: for a measurement outside the search, e.g. after the gradient stage). ``record_gradients``: run the
    forward as in training (no gradient is computed; a compiled training forward then needs no inference graph).
    ``shard``: ``batches`` are this rank's share; the mean is over every rank's."""
    with torch.set_grad_enabled(record_gradients):
        values = [float(batch_fitness(forward, images, ref, fitness, temperature, normalize).detach())
                  for images, ref in zip(batches, reference)]
    return (shard or Shard()).mean(values)


@torch.no_grad()
def mean_fitness_with_features(model: SegmentedModel, batches: list[torch.Tensor], reference: list[torch.Tensor],
                               fitness: Callable, temperature: float, normalize: bool,
                               features: FeatureTerm, shard: Shard | None = None) -> float:
    """:func:`mean_fitness` of ``model`` run eagerly, plus the :class:`FeatureTerm` on its features before the
    head: what the search's evaluator computes with ``features``, one plain forward per batch, in fp32."""
    values = []
    for images, ref, feature_ref in zip(batches, reference, features.reference):
        output, quantized_features = model.forward_with_features(images, eager=True)
        value = fitness(_as_output_tensor(output).float(), ref.float(), temperature=temperature, normalize=normalize)
        value = value + features.weight * infonce(quantized_features, feature_ref, temperature=temperature)
        values.append(float(value))
    return (shard or Shard()).mean(values)
