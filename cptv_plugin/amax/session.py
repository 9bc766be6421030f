"""Refinement for frameworks whose quantizers hold an ``amax`` (NVIDIA ModelOpt, pytorch-quantization).

The user's eager model is traced once with torch.fx, every module that owns a quantizer kept whole (a leaf), so
candidates are evaluated through the framework's own fake-quant forward. The trace is cut at block
boundaries for suffix-only evaluation. A model that does not trace (Hugging Face's) is cut by calling its blocks
(:mod:`cptv_plugin.block_calls`), and one that cannot be cut that way either is evaluated whole (correct, slower).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

import torch
from torch import fx, nn

from ..blocks import ModelStructure, discover_blocks
from ..engine import Segment, SegmentedModel
from ..fx.graph import GraphSplitError, assign_groups, split_graph
from ..handles import Group, NotCalibratedError, ScaleHandle, clamp_values, round_values

__all__ = ["AmaxHandle", "AmaxSession", "QuantizerKind", "NotCalibratedError", "UnsupportedQuantizerError",
           "integer_fake_quant"]

logger = logging.getLogger(__name__)


class UnsupportedQuantizerError(ValueError):
    """A quantizer format the search cannot move (floating-point formats, block quantization)."""


@dataclass(frozen=True)
class QuantizerKind:
    """How one framework's quantizer module is read and switched.

    Attributes:
        framework: name used in messages ("modelopt", "pytorch-quantization").
        quantizer_type: the framework's ``TensorQuantizer`` class.
        is_enabled / enable / disable: read and switch a quantizer's fake quantization.
        is_calibrating: whether the quantizer still collects statistics instead of quantizing.
        set_amax: write a new ``amax`` of the quantizer's own shape and dtype.
        compilable: a context manager factory ``(model, enabled quantizers)`` that makes the model traceable by
            ``torch.compile`` while it lasts and yields whether it could; ``None`` when the framework has no such
            route.
    """

    framework: str
    quantizer_type: type
    is_enabled: Callable[[nn.Module], bool]
    enable: Callable[[nn.Module], None]
    disable: Callable[[nn.Module], None]
    is_calibrating: Callable[[nn.Module], bool]
    set_amax: Callable[[nn.Module, torch.Tensor], None] = lambda q, amax: setattr(q, "amax", amax)
    compilable: Callable[[nn.Module, list[nn.Module]], ContextManager[bool]] | None = None


def quantizer_role(path: str) -> str:
    """``"weight"`` for a layer's weight quantizer (ModelOpt ``weight_quantizer``, pytorch-quantization
    ``_weight_quantizer``), else ``"activation"``."""
    return "weight" if path.endswith("weight_quantizer") else "activation"


def never_reached_quantizers(quantizers: dict[str, nn.Module], kind: QuantizerKind, log: bool = True) -> set[str]:
    """The enabled quantizers of layers that calibration never reached: one of the layer's quantizers has no amax
    while others in the model have one. Such a layer's forward never runs (nn.MultiheadAttention's out_proj, whose
    weight the attention reads directly; torchvision Swin's qkv and proj), so its quantizers change nothing the model
    computes; its weight quantizer, which ModelOpt calibrates apart from the forward, does not run either. Logs them
    (``log``); raises :class:`NotCalibratedError` when no enabled quantizer has an amax (a model never calibrated)."""
    enabled = [path for path, q in quantizers.items() if kind.is_enabled(q)]
    uncalibrated = [path for path in enabled if getattr(quantizers[path], "amax", None) is None
                    and not kind.is_calibrating(quantizers[path])]
    if uncalibrated and len(uncalibrated) == len(enabled):
        raise NotCalibratedError(f"{uncalibrated[0]} has no amax, nor has any other enabled quantizer: calibrate "
                                 "the model before refining it")
    bypassed = {path.rpartition(".")[0] for path in uncalibrated}
    never_ran = {path for path in enabled if path.rpartition(".")[0] in bypassed}
    if never_ran and log:
        logger.warning(
            "%d enabled %s quantizer(s) of %d layer(s) were never reached by calibration although the others were "
            "(e.g. %s has no amax): those layers' forward never runs (as nn.MultiheadAttention's out_proj, whose "
            "weight the attention reads directly, or torchvision Swin's qkv and proj). They change nothing the model "
            "computes and are left out.", len(never_ran), kind.framework, len(bypassed), uncalibrated[0])
    return never_ran


class AmaxHandle(ScaleHandle):
    """A quantizer that stores its range as ``amax``: the scale is ``amax / maxbound`` (maxbound = 2^(b−1) − 1
    signed, 2^b − 1 unsigned), the same step that the framework's fake quantization and ONNX export use."""

    def __init__(self, name: str, quantizer: nn.Module, role: str, kind: QuantizerKind):
        self.name, self.quantizer, self.role, self.kind = name, quantizer, role, kind
        bits = int(quantizer.num_bits)
        unsigned = bool(getattr(quantizer, "unsigned", False))
        narrow = bool(getattr(quantizer, "narrow_range", False))
        self.maxbound = 2 ** (bits - 1 + int(unsigned)) - 1
        self.quant_max = self.maxbound
        self.quant_min = 0 if unsigned else -self.maxbound - (0 if narrow else 1)
        amax = quantizer.amax
        self.axis = None if amax.numel() == 1 else next(
            (d for d, size in enumerate(amax.shape) if size > 1), None)
        if not bool(torch.isfinite(amax).all()) or not bool((amax > 0).all()):
            raise NotCalibratedError(f"{name}: amax must be finite and positive, got min {float(amax.min()):g}; "
                                     "recalibrate the model")

    @property
    def bits(self) -> int:
        return int(self.quantizer.num_bits)

    def read(self) -> torch.Tensor:
        return self.quantizer.amax.detach().float() / self.maxbound

    def set(self, scale: torch.Tensor) -> None:
        current = self.quantizer.amax
        self.kind.set_amax(self.quantizer, (scale.to(current.device, torch.float32) * self.maxbound).to(
            current.dtype).reshape(current.shape))

    def commit(self) -> None:
        """``amax`` is the framework's own state: what ``set`` wrote is what save/export carry."""

    def fake_quantize(self, inputs: torch.Tensor, scale: torch.Tensor,
                      straight_through: bool = False) -> torch.Tensor:
        """The framework's integer arithmetic (``integer_fake_quant``) at ``amax = scale × maxbound`` (per tensor:
        any ``scale`` shape that broadcasts against ``inputs``)."""
        return _integer_fake_quant(inputs, self._amax(scale, inputs), float(self.quant_min), float(self.quant_max),
                                   straight_through)

    def fake_quantize_with_mask(self, inputs: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _integer_fake_quant(inputs, self._amax(scale, inputs), float(self.quant_min), float(self.quant_max),
                                   with_mask=True)

    def _amax(self, scale: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """``scale × maxbound`` on the input's device, shaped as the quantizer's amax where per channel."""
        amax = scale.to(inputs.device, torch.float32) * self.maxbound
        return amax.reshape(self.quantizer.amax.shape) if self.axis is not None else amax

    @property
    def quantizer_module(self) -> nn.Module | None:
        """The quantizer, called with the tensor it quantizes (not where it scales its input first: ModelOpt's
        ``pre_quant_scale`` of SmoothQuant/AWQ)."""
        return None if getattr(self.quantizer, "pre_quant_scale", None) is not None else self.quantizer

    @property
    def input_module(self) -> nn.Module | None:
        """The quantizer itself (a disabled quantizer passes its input through), unless it scales its input
        before quantizing (ModelOpt's ``pre_quant_scale`` of SmoothQuant/AWQ)."""
        if self.role != "activation" or getattr(self.quantizer, "pre_quant_scale", None) is not None:
            return None
        return self.quantizer


def integer_fake_quant(inputs: torch.Tensor, quantizer: nn.Module) -> torch.Tensor:
    """The integer fake quantization of an amax quantizer (ModelOpt's and pytorch-quantization's arithmetic) in
    plain torch ops, so that ``torch.compile`` traces it whole and fuses it into its neighbours' kernels: in fp32,
    ``scale = maxbound / amax``, round half to even, clamp to the integer range, divide by ``scale``; the result in
    the input's dtype. Used only during a compiled search or gradient stage, for quantizers the framework's
    route accepted. With gradients recorded the rounding passes them straight through, as the framework's own
    fake quant does: a quantizer the gradient stage does not move (outside the searched groups) must not cut the
    gradient of every scale before it."""
    bits, unsigned = int(quantizer.num_bits), bool(quantizer.unsigned)
    maxbound = float(2 ** (bits - 1 + int(unsigned)) - 1)
    minbound = 0.0 if unsigned else (-maxbound if quantizer.narrow_range else -maxbound - 1.0)
    return _integer_fake_quant(inputs, quantizer._amax.float(), minbound, maxbound,
                               straight_through=inputs.requires_grad)


def _integer_fake_quant(inputs: torch.Tensor, amax: torch.Tensor, minbound: float, maxbound: float,
                        straight_through: bool = False, with_mask: bool = False):
    """The arithmetic of :func:`integer_fake_quant`; ``with_mask``: also where the rounded value lies inside the
    integer range, as ``(output, mask)``."""
    scale = torch.full_like(amax, maxbound) / amax  # a true division: ``float / tensor`` multiplies by a reciprocal
    rounded = round_values(inputs.float() * scale, straight_through)
    clamped = clamp_values(rounded, minbound, maxbound, straight_through)
    output = (clamped / scale).to(inputs.dtype)
    return (output, rounded == clamped) if with_mask else output


def _owner_node(path: str, nodes: dict[str, fx.Node]) -> fx.Node | None:
    while path:
        if path in nodes:
            return nodes[path]
        path = path.rpartition(".")[0]
    return None


class AmaxSession:
    """The handles, groups and segmented evaluation model of an eager model with amax quantizers."""

    # measured with dynamo (torch 2.14): pytorch-quantization's fake quant calls logging, ModelOpt's own branches on
    # a tensor value (``if min_amax < 0``); either breaks the graph at every quantizer (57-59 graphs for a
    # 6-segment ViT), so compiling would cost time and recompiles and fuse nothing. Each framework's
    # ``QuantizerKind.compilable`` routes its quantizers through ``integer_fake_quant`` instead, which compiles whole.
    graph_breaking = "the framework's quantizers break torch.compile's graph at every quantizer"

    @contextlib.contextmanager
    def compilable(self) -> Iterator[str | None]:
        """While it lasts, the enabled quantizers run a fake quant that ``torch.compile`` traces whole; yields
        ``None`` when that holds for all of them, else why compiling would not help."""
        if self.kind.compilable is None:
            yield self.graph_breaking
            return
        enabled = [q for path, q in self.quantizers.items() if self.initially_enabled[path]]
        with self.kind.compilable(self.module, enabled) as possible:
            yield None if possible else (
                f"some {self.kind.framework} quantizers use a fake quantization cptv_plugin cannot compile (a custom "
                "backend, a bias, learned or clipped ranges, ONNX-export mode, a non-integer format)")

    def __init__(self, model: nn.Module, kind: QuantizerKind, *, blocks: list[str] | None = None,
                 roles=("weight", "activation"), search_outside_blocks: bool = True):
        self.module, self.kind = model, kind
        self.quantizers = {path: q for path, q in model.named_modules() if isinstance(q, kind.quantizer_type)}
        self.initially_enabled = {path: kind.is_enabled(q) for path, q in self.quantizers.items()}
        handles: list[AmaxHandle] = []
        never_ran = never_reached_quantizers(self.quantizers, kind)
        for path, quantizer in self.quantizers.items():
            if not self.initially_enabled[path]:
                continue
            if kind.is_calibrating(quantizer):
                raise NotCalibratedError(
                    f"{path} is still calibrating: finish calibration first ({kind.framework}: load the "
                    "calibrated amax and switch quantization back on)")
            bits = getattr(quantizer, "num_bits", None)
            if not isinstance(bits, int) or isinstance(bits, bool) or getattr(quantizer, "block_sizes", None):
                raise UnsupportedQuantizerError(
                    f"{path}: {kind.framework} quantizer with num_bits={bits!r}"
                    + (f", block_sizes={quantizer.block_sizes}" if getattr(quantizer, "block_sizes", None) else "")
                    + " is not supported: cptv_plugin refines integer per-tensor and per-channel quantizers "
                    "(e.g. INT8/INT4 weights, INT8 activations). Leave that quantizer out or disable it.")
            if path in never_ran:
                continue
            role = quantizer_role(path)
            if role in roles:
                handle = AmaxHandle(path, quantizer, role, kind)
                if role == "weight":
                    owner = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
                    handle.weight = getattr(owner, "weight", None)
                handles.append(handle)
        if not handles:
            from ..frameworks import other_framework_hint
            from ..fx.refine import NoQuantizersError

            raise NoQuantizersError(
                f"the model holds no enabled, calibrated {kind.framework} quantizer to refine; quantize and "
                "calibrate it first." + other_framework_hint(model, kind.framework))
        self.adapter, self.block_paths = discover_blocks(ModelStructure.from_module(model), blocks)
        self.all_handles = handles
        self._search_outside_blocks = search_outside_blocks
        self._untraced: str | None = None  # why torch.fx could not cut the model, until :meth:`prepare` cuts it
        self._set_groups(*self._segment(model))

    def _set_groups(self, chain: SegmentedModel, segment_of_group: dict[int, int],
                    group_of_path: Callable[[str], int]) -> None:
        self.chain = chain
        names = ["prefix"] + self.block_paths + ["head"]
        members: dict[int, list[AmaxHandle]] = {g: [] for g in range(len(names))}
        for handle in self.all_handles:
            members[group_of_path(handle.name)].append(handle)
        self.groups = [Group(name, members[i], segment=segment_of_group.get(i, 0)) for i, name in enumerate(names)
                       if members[i] and (self._search_outside_blocks or 0 < i < len(names) - 1)]

    @functools.cached_property
    def _module_order(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(dict(self.module.named_modules()))}

    def _group_by_order(self, path: str) -> int:
        """The group of a module path by where it is registered: in a block, before the first or after."""
        for index, block in enumerate(self.block_paths):
            if path == block or path.startswith(block + "."):
                return index + 1
        order = self._module_order
        first_block = min((order[b] for b in self.block_paths), default=0)
        return 0 if order.get(path, 0) < first_block else len(self.block_paths) + 1

    def prepare(self, images: torch.Tensor) -> None:
        """Cut a model torch.fx could not trace between its blocks by calling them (:mod:`cptv_plugin.block_calls`),
        checked on ``images``; where that fails too, every candidate runs the whole model (a warning says why)."""
        if self._untraced is None:
            return
        from ..block_calls import CutError, cut_between_blocks

        training = self.module.training
        self.module.eval()
        try:
            chain, groups = cut_between_blocks(self.module, self.block_paths, images, self.quantizers)
        except CutError as error:
            logger.warning("cannot cut %s between blocks: torch.fx cannot trace it (%s) and calling its blocks one "
                           "by one does not reproduce it (%s): every candidate runs the whole model",
                           type(self.module).__name__, self._untraced, error)
            recorded = error.groups  # where each quantizer ran in the recorded forward: group them so, not by name
            if recorded:
                self._set_groups(self.chain, {}, lambda path: recorded.get(path, self._group_by_order(path)))
            return
        finally:
            self.module.train(training)
        logger.info("cut %s between blocks by calling them one by one (torch.fx cannot trace it: %s)",
                    type(self.module).__name__, self._untraced)
        self._untraced = None
        self._set_groups(chain, {g: g for g in range(len(self.block_paths) + 2)},
                         lambda path: groups.get(path, self._group_by_order(path)))

    def _segment(self, model: nn.Module):
        """Trace ``model`` with quantizer-owning modules as leaves and cut it between blocks."""
        quantizer_type = self.kind.quantizer_type

        class _Tracer(fx.Tracer):
            def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
                return isinstance(module, quantizer_type) or any(
                    isinstance(child, quantizer_type) for child in module.children()) or \
                    super().is_leaf_module(module, qualified_name)

        training = model.training
        try:
            model.eval()  # trace the inference path: timm branches on self.training in Python
            graph = _Tracer().trace(model)
            traced = fx.GraphModule(model, graph)
            groups = assign_groups(graph, self.block_paths,
                                   module_path_of=lambda n: n.target if n.op == "call_module" else None)
            chain, segment_of_group = split_graph(traced, groups)
            nodes = {n.target: n for n in graph.nodes if n.op == "call_module"}

            def group_of_path(path: str) -> int:
                node = _owner_node(path, nodes)
                return groups[node] if node is not None else self._group_by_order(path)

            return chain, segment_of_group, group_of_path
        except (GraphSplitError, fx.proxy.TraceError, TypeError, RuntimeError, AttributeError) as error:
            self._untraced = f"{type(error).__name__}: {str(error).split('. ')[0]}"  # its first sentence
        finally:
            model.train(training)
        chain = SegmentedModel([Segment(model, ["images"], None)], lambda images: {"images": images})
        return chain, {}, self._group_by_order

    def set_quantization(self, enabled: bool) -> None:
        for path, quantizer in self.quantizers.items():
            if enabled and self.initially_enabled[path]:
                self.kind.enable(quantizer)
            else:
                self.kind.disable(quantizer)

    def snapshot(self) -> dict:
        return {"amax": [h.quantizer.amax.detach().clone() for h in self.all_handles],
                "training": self.module.training}

    def restore(self, state: dict) -> None:
        for handle, amax in zip(self.all_handles, state["amax"]):
            self.kind.set_amax(handle.quantizer, amax)
        self.set_quantization(True)
        self.module.train(state["training"])

    def begin(self) -> None:
        self._training = self.module.training
        self.module.eval()

    def clip_weights(self, keep: bool = False) -> tuple[int, Callable[[], None] | None]:
        """Nothing to clip, nor to undo: ``amax`` quantizers keep the float weights, which the export quantizes at
        ``amax``."""
        return 0, None

    def commit(self) -> None:
        for handle in self.all_handles:
            handle.commit()
        self.module.train(self._training)
