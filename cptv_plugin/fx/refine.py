"""``refine_fx``: CPT-V refinement of a torch.ao FX model between calibration and ``convert_fx``."""

from __future__ import annotations

import contextlib
import logging
import operator
from typing import Callable, Iterator, Literal

import torch
from torch import fx, nn
from torch.ao.quantization.fake_quantize import FakeQuantizeBase, FixedQParamsFakeQuantize
from torch.ao.quantization.observer import FixedQParamsObserver, ObserverBase

from ..blocks import ModelStructure, discover_blocks
from ..config import SearchConfig, SearchConfigLike
from ..handles import Group
from ..refinement import run_refinement
from ..search import RefineResult
from .graph import GraphSplitError, assign_groups, split_graph
from .handles import FakeQuantizeHandle, ObserverHandle, WeightObserverHandle, get_attribute
from .quantizers import (DTYPE_RANGES, FakeQuantizeView, RefinedObserver, SimulatedQuantizer, SimulatedWeightModule,
                         _pt2e_refined_observer, is_fused_fake_quantize)

__all__ = ["refine_fx", "NotPreparedError", "NoQuantizersError", "FxSession"]

logger = logging.getLogger(__name__)

Target = Literal["convert_fx", "fake_quant"]
CLAMPED_WEIGHTS = "cptv_plugin.clamped_weights"  # GraphModule.meta key: weights a commit clipped (kept by deepcopy)


class NotPreparedError(TypeError):
    """The model is not what the function takes: a GraphModule from ``prepare_fx`` / ``prepare_qat_fx`` for
    ``refine_fx``, one from ``prepare_pt2e`` / ``prepare_qat_pt2e`` for ``refine_pt2e``."""


class NoQuantizersError(ValueError):
    """The model holds no quantizer that the search could move."""


def _observed_attrs(model: nn.Module):
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict) and "_observed_graph_module_attrs" in meta:
        return meta["_observed_graph_module_attrs"]
    return getattr(model, "_observed_graph_module_attrs", None)


def _torchao_types(*names: str) -> tuple[type, ...]:
    """torchao's PT2E counterparts of torch.ao's classes (PT2E models hold those), when torchao is installed."""
    try:
        import torchao.quantization.pt2e as pt2e
    except ImportError:
        return ()
    return tuple(getattr(pt2e, name) for name in names if hasattr(pt2e, name))


def observer_types() -> tuple[type, ...]:
    return (ObserverBase,) + _torchao_types("ObserverBase")


def fake_quant_types() -> tuple[type, ...]:
    return (FakeQuantizeBase,) + _torchao_types("FakeQuantizeBase")


def _quantizing_observer(module: nn.Module) -> bool:
    """An observer or FakeQuantize that converts into a quantize/dequantize pair."""
    if not isinstance(module, observer_types() + fake_quant_types()):
        return False
    return getattr(module, "dtype", None) in DTYPE_RANGES and not getattr(module, "is_dynamic", False) \
        and hasattr(module, "quant_min")


def _searchable(module: nn.Module) -> bool:
    fixed = (FixedQParamsObserver, FixedQParamsFakeQuantize) + _torchao_types(
        "FixedQParamsObserver", "FixedQParamsFakeQuantize", "DerivedObserverOrFakeQuantize")
    return _quantizing_observer(module) and not isinstance(module, fixed)


_MULTIPLIES = (operator.mul, torch.mul)


def _rescaled_exactly_by_convert(node: fx.Node, module: nn.Module, prepared: fx.GraphModule,
                                 module_path: dict[fx.Node, str]) -> bool:
    """Whether observer ``node`` quantizes ``x * c`` (``c`` a Python number, e.g. attention's scaled query) with
    the very observer that quantized ``x`` (torch.ao shares it: a multiply by a scalar keeps its input's
    observer). ``convert_fx`` lowers that to torch's quantized multiply by a scalar, which rescales exactly (scale
    × c, the same integers): nothing is rounded again. The reference model and FakeQuantize round ``x * c`` onto
    ``x``'s grid instead, ``c`` times coarser than its range needs."""
    producer = node.args[0] if node.args else None
    if not isinstance(producer, fx.Node) or getattr(module, "dtype", None) != torch.quint8:
        return False
    if not ((producer.op == "call_function" and producer.target in _MULTIPLIES)
            or (producer.op == "call_method" and producer.target == "mul")):
        return False
    operands = producer.args[:2]
    tensors = [a for a in operands if isinstance(a, fx.Node)]
    numbers = [a for a in operands if isinstance(a, (int, float)) and not isinstance(a, bool)]
    if len(tensors) != 1 or len(numbers) != 1 or len(producer.args) != 2 or producer.kwargs:
        return False
    source = module_path.get(tensors[0])
    return source is not None and prepared.get_submodule(source) is module


def _weight_quantized_by_convert(node: fx.Node, module: nn.Module, observed: set[str]) -> bool:
    """Whether ``convert_fx`` would quantize this plain module's weight, with torch.ao's native backend config
    or its TensorRT one (``get_tensorrt_backend_config()``: symmetric int8 activations)."""
    from torch.ao.quantization.backend_config import get_native_backend_config, get_tensorrt_backend_config
    from torch.ao.quantization.backend_config.utils import get_pattern_to_dtype_configs
    from torch.ao.quantization.fx.qconfig_mapping_utils import _is_qconfig_supported_by_dtype_configs
    from torch.ao.quantization.utils import weight_is_quantized

    qconfig = getattr(module, "qconfig", None)
    if qconfig is None or node.name not in observed or not weight_is_quantized(qconfig):
        return False
    for backend_config in (get_native_backend_config(), get_tensorrt_backend_config()):
        dtype_configs = get_pattern_to_dtype_configs(backend_config).get(type(module), [])
        if _is_qconfig_supported_by_dtype_configs(qconfig, dtype_configs):
            return True
    return False


class FxSession:
    """Everything refine_fx builds around the user's GraphModule: the handles, an evaluation copy of the
    graph in which observers simulate quantization, its segments and the search groups."""

    @contextlib.contextmanager
    def compilable(self) -> Iterator[str | None]:
        """The simulated quantizers compile as one graph per segment (tested): nothing to switch."""
        yield None

    def __init__(self, prepared: fx.GraphModule, *, blocks: list[str] | None = None,
                 target: Target = "convert_fx", clamp_weights: bool = True, roles=("weight", "activation"),
                 search_outside_blocks: bool = True, flavor: Literal["fx", "pt2e"] = "fx"):
        if flavor == "pt2e":
            # convert_pt2e's decomposed quantize ops honour each observer's own (possibly narrowed) range, and
            # PT2E observes weights as graph values: no qconfig, no clipping needed
            target, refined_cls = "fake_quant", _pt2e_refined_observer()
        else:
            refined_cls = RefinedObserver
        if flavor == "fx":
            from ..pt2e import is_pt2e_prepared

            if is_pt2e_prepared(prepared):  # it carries FX's observed-graph metadata too, but runs other observers
                raise NotPreparedError(
                    "refine_fx takes torch.ao's prepare_fx models; this one comes from torchao's prepare_pt2e: call "
                    "cptv_plugin.refine_pt2e on it, or cptv_plugin.refine, which recognises the framework.")
        if flavor == "fx" and (not isinstance(prepared, fx.GraphModule) or _observed_attrs(prepared) is None):
            from ..frameworks import other_framework_hint

            raise NotPreparedError(
                "refine_fx needs the GraphModule returned by torch.ao's prepare_fx or prepare_qat_fx, calibrated "
                f"on images; got {type(prepared).__name__}. Run prepare_fx(model, qconfig_mapping, example_inputs) "
                "and a calibration loop first." + other_framework_hint(prepared, "fx")
            )
        if target not in ("convert_fx", "fake_quant"):
            raise ValueError(f"target must be 'convert_fx' or 'fake_quant', got {target!r}")
        self.prepared = self.module = prepared
        attrs = _observed_attrs(prepared)
        observed = set(getattr(attrs, "observed_node_names", set()) or set())


        graph = fx.Graph()
        mapping: dict[fx.Node, fx.Node] = {}
        graph.output(graph.graph_copy(prepared.graph, mapping))
        self.handles = []
        self.swapped: list[tuple[nn.Module, nn.Module]] = []  # (QAT module, its fused weight FakeQuantize)
        self.fake_quants: list[FakeQuantizeBase] = []
        self.simulated: list[SimulatedQuantizer] = []
        handle_of_node: dict[fx.Node, object] = {}
        root: dict[str, object] = {}
        module_path: dict[fx.Node, str] = {}
        inserted: set[fx.Node] = set()
        by_module: dict[int, object] = {}
        narrowed_activations = []
        wide = {"activation": False, "weight": False}  # 8-bit ranges on both sides of a matmul (see below)
        rounded_again = []  # narrowed products x * c that FakeQuantize rounds again on x's grid
        for original, node in mapping.items():
            if node.op == "get_attr":
                root[node.target] = get_attribute(prepared, node.target)
            if node.op != "call_module":
                continue
            module = prepared.get_submodule(node.target)
            module_path[node] = node.target
            if isinstance(module, observer_types() + fake_quant_types()):
                inserted.add(node)
                quantizing = _quantizing_observer(module)
                exact_in_convert = quantizing and _rescaled_exactly_by_convert(node, module, prepared, module_path)
                if exact_in_convert and flavor == "fx" and module.quant_max - module.quant_min < 255 \
                        and (target == "fake_quant" or isinstance(module, fake_quant_types())):
                    rounded_again.append(node.target)
                # convert_fx's kernel multiplies exactly: simulated as such; the shared observer's refined scale
                # still goes to this path too (commit), as convert_fx reads it from both
                exact = exact_in_convert and target == "convert_fx" and isinstance(module, observer_types())
                handle = by_module.get(id(module)) if exact else None
                if handle is not None and node.target not in handle.paths:
                    handle.paths.append(node.target)
                if not quantizing or exact:
                    node.replace_all_uses_with(node.args[0])
                    graph.erase_node(node)
                    continue
                # PT2E observes weights as values: an observer whose input is a constant quantizes a weight
                role = "weight" if node.all_input_nodes and all(
                    a.op == "get_attr" for a in node.all_input_nodes) else "activation"
                # searched or not, convert_fx's kernels compute with it (in FX a constant such as a position
                # embedding is observed as a value too: not a matmul's weight, which the module's qconfig observes)
                wide["activation"] |= role == "activation" and _eight_bit_range(module)
                if isinstance(module, fake_quant_types()):
                    self.fake_quants.append(module)
                    root[node.target] = FakeQuantizeView(module) if is_fused_fake_quantize(module) else module
                    if _searchable(module) and role in roles:
                        handle = by_module.get(id(module)) or FakeQuantizeHandle(node.target, module, role,
                                                                                 refined_cls=refined_cls)
                        by_module[id(module)] = handle
                        handle_of_node[node] = handle
                    continue
                if _searchable(module) and role in roles:
                    handle = by_module.get(id(module))
                    if handle is None:
                        handle = ObserverHandle(prepared, node.target, module, clamp_to_dtype=target == "convert_fx",
                                                role=role, refined_cls=refined_cls)
                        if role == "weight":  # PT2E: the weight is the constant the observer reads
                            handle.weight = get_attribute(prepared, node.all_input_nodes[0].target)
                        by_module[id(module)] = handle
                    elif node.target not in handle.paths:
                        handle.paths.append(node.target)
                    handle_of_node[node] = handle
                    sim = handle.quantizer
                    if handle.narrowed and target == "convert_fx":
                        narrowed_activations.append(node.target)
                else:  # fixed qparams (or activations not searched): simulate without searching
                    scale, zero_point = module.calculate_qparams()
                    low, high = DTYPE_RANGES[module.dtype] if target == "convert_fx" else (module.quant_min,
                                                                                           module.quant_max)
                    axis = module.ch_axis if scale.numel() > 1 else None
                    sim = SimulatedQuantizer(scale, zero_point, low, high, axis)
                name = f"cptv_sim_{len(self.simulated)}"
                self.simulated.append(sim)
                root[name] = sim
                node.target = name
                continue
            weight_fq = getattr(module, "weight_fake_quant", None)
            if isinstance(weight_fq, ObserverBase):
                raise NotImplementedError(
                    f"{node.target} is a QAT module whose weight_fake_quant is an observer, not a FakeQuantize: "
                    "use FakeQuantize in the QAT qconfig (e.g. fx_qconfig_mapping(bits, qat=True)), or prepare_fx "
                    "for post-training quantization")
            if isinstance(weight_fq, FakeQuantizeBase):  # a QAT module: its own forward fake-quantizes
                wide["weight"] |= _eight_bit_range(weight_fq)
                root[node.target] = module
                self.fake_quants.append(weight_fq)
                if is_fused_fake_quantize(weight_fq):  # put back by commit() / restore()
                    self.swapped.append((module, weight_fq))
                    module.weight_fake_quant = FakeQuantizeView(weight_fq)
                if _searchable(weight_fq) and "weight" in roles:
                    handle_of_node[node] = FakeQuantizeHandle(f"{node.target}.weight", weight_fq, "weight",
                                                              weight=module.weight, clamp_weights=clamp_weights)
                continue
            leader = module[0] if isinstance(module, nn.Sequential) and len(module) else module
            if isinstance(leader, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and \
                    _weight_quantized_by_convert(original, module, observed):
                handle = WeightObserverHandle(node.target, module, clamp_weights)
                wide["weight"] |= _eight_bit_range(handle)
                if "weight" in roles:
                    handle_of_node[node] = handle
                name = f"cptv_weight_{len(self.simulated)}"
                self.simulated.append(handle.quantizer)
                root[name] = SimulatedWeightModule(module, handle.quantizer)
                node.target = name
                continue
            root[node.target] = module
        if narrowed_activations:
            logger.warning(
                "%d activation quantizer(s) have a range narrower than their dtype (e.g. %s). convert_fx's "
                "kernels quantize activations with the full dtype range, so the search optimizes that; pass "
                "target='fake_quant' to optimize the narrowed range as FakeQuantize computes it.",
                len(narrowed_activations), narrowed_activations[0])
        if flavor == "fx" and target == "convert_fx" and all(wide.values()) and _saturating_int8_kernels():
            logger.warning(
                "this CPU has no VNNI: torch.ao's %s kernels (the converted model's Linear and Conv) add pairs of "
                "8-bit activation x 8-bit weight products in 16 bits and saturate, so the converted model can end "
                "far from the one the search refines (mean logit distance 0.04-0.08 against 0.002 with VNNI, on the "
                "ViT-like reference model at W8A8). Observe activations with reduce_range=True, as torch.ao's "
                "get_default_qconfig('x86') does, or run the converted model on a CPU with VNNI.",
                torch.backends.quantized.engine)
        if rounded_again:
            logger.warning(
                "%d scaled product(s) x * c (e.g. attention's q * scale; first: %s) are rounded again on the grid of "
                "x, whose observer torch.ao gives them: at low-bit activations c times coarser than they need "
                "(convert_fx's kernel multiplies exactly). Giving the multiply no qconfig keeps q * scale on q's grid "
                "at no cost: qconfig_mapping.set_object_type(operator.mul, None) before prepare_fx (the DeiT-like "
                "reference model at W4A4: 10 %% -> 30 %% at MinMax; README, 4-bit activations).",
                len(rounded_again), rounded_again[0])
        # quantizers of constants (PT2E weight observers sit at the top of the graph): run them just before their
        # first user, so they belong to that user's block and the graph can be cut between blocks
        order = {n: i for i, n in enumerate(graph.nodes)}
        for node in [n for n in graph.nodes if n in inserted and n.all_input_nodes
                     and all(a.op == "get_attr" for a in n.all_input_nodes) and n.users]:
            min(node.users, key=order.__getitem__).prepend(node)
        self.eval_module = fx.GraphModule(root, graph)
        self.target = target

        structure = ModelStructure.from_graph_module(prepared)
        self.adapter, self.block_paths = discover_blocks(structure, blocks)
        groups_of = assign_groups(graph, self.block_paths, module_path_of=module_path.get,
                                  is_inserted=lambda n: n in inserted)
        try:
            self.chain, group_to_segment = split_graph(self.eval_module, groups_of)
        except GraphSplitError as error:
            logger.warning("cannot cut the graph between blocks (%s): every candidate runs the whole model", error)
            self.chain, group_to_segment = split_graph(self.eval_module, {n: 0 for n in groups_of})
            group_to_segment = {g: 0 for g in range(len(self.block_paths) + 2)}

        names = ["prefix"] + self.block_paths + ["head"]
        members: dict[int, list] = {g: [] for g in range(len(names))}
        seen = set()
        for node, handle in handle_of_node.items():
            if id(handle) in seen:
                continue
            seen.add(id(handle))
            members[groups_of[node]].append(handle)
        self.groups: list[Group] = []
        for index, name in enumerate(names):
            if not members[index]:
                continue
            if not search_outside_blocks and index in (0, len(names) - 1):
                continue
            self.groups.append(Group(name, members[index], segment=group_to_segment[index]))
        self.all_handles = [h for g in members.values() for h in g]
        if not self.all_handles:
            raise NoQuantizersError(
                "the prepared model holds no quantizer that refine_fx can move: check the qconfig mapping "
                "(static int8 observers or FakeQuantize are needed; dynamic and float16 qconfigs have no scales)"
            )

    def set_quantization(self, enabled: bool) -> None:
        """Switch every simulated quantizer and FakeQuantize on or off (off: the full-precision reference)."""
        for sim in self.simulated:
            sim.enabled = enabled
        for fq in self.fake_quants:
            fq.enable_fake_quant(enabled)

    def snapshot(self) -> dict:
        """Everything of the user's model that the search or commit may change, for restoring on failure."""
        state = {"scales": [h.read() for h in self.all_handles]}
        state["fq_flags"] = [(fq.fake_quant_enabled.clone(), fq.observer_enabled.clone(),
                              fq.activation_post_process) for fq in self.fake_quants]
        state["weights"] = [h.weight.detach().clone() for h in self.all_handles
                            if getattr(h, "weight", None) is not None]
        state["qconfigs"] = [(h.module, h.qconfig) for h in self.all_handles if isinstance(h, WeightObserverHandle)]
        state["modules"] = {path: h.observer for h in self.all_handles if isinstance(h, ObserverHandle)
                            for path in h.paths}
        return state

    def _unswap(self) -> None:
        for module, weight_fq in self.swapped:
            module.weight_fake_quant = weight_fq

    def restore(self, state: dict) -> None:
        from .handles import set_submodule

        self._unswap()
        for handle, scale in zip(self.all_handles, state["scales"]):
            handle.set(scale)
        for fq, (fake_quant_on, observer_on, observer) in zip(self.fake_quants, state["fq_flags"]):
            fq.fake_quant_enabled.copy_(fake_quant_on)
            fq.observer_enabled.copy_(observer_on)
            fq.activation_post_process = observer
        with torch.no_grad():
            for handle, weight in zip([h for h in self.all_handles if getattr(h, "weight", None) is not None],
                                      state["weights"]):
                handle.weight.copy_(weight)
        for module, qconfig in state["qconfigs"]:
            module.qconfig = qconfig
        for path, observer in state["modules"].items():
            set_submodule(self.prepared, path, observer)

    def prepare(self, images: torch.Tensor) -> None:
        """Nothing to set up from images: the traced graph is cut already."""

    def begin(self) -> None:
        """Stop FakeQuantize observers from moving the scales while the search evaluates candidates."""
        for fq in self.fake_quants:
            fq.disable_observer()

    def clip_weights(self, keep: bool = False) -> tuple[int, Callable[[], None] | None]:
        """Clip the low-bit weights onto their narrowed grid at the current scales now, as :meth:`commit` does at the
        final ones (the fake-quantized model does not change). Returns how many weights moved and, with ``keep``,
        what puts them back."""
        clipping = [h for h in self.all_handles if getattr(h, "clamps_weight", False)]
        originals = [h.weight.detach().clone() for h in clipping] if keep else None
        moved = sum(h.clip_weight() for h in clipping)

        def undo() -> None:
            with torch.no_grad():
                for handle, weight in zip(clipping, originals):
                    handle.weight.copy_(weight)

        return moved, undo if keep else None

    def commit(self) -> None:
        self._unswap()
        for handle in self.all_handles:
            handle.commit()
        # with clipped weights the model with quantization off is no longer the full-precision one: see refine_fx
        self.prepared.meta[CLAMPED_WEIGHTS] = [h.name for h in self.all_handles if getattr(h, "clamps_weight", False)]


def refine_fx(prepared: fx.GraphModule, calib_data, *, config: SearchConfigLike = None,
              fp_model: nn.Module | None = None, blocks: list[str] | None = None, target: Target = "convert_fx",
              clamp_weights: bool = True) -> RefineResult:
    """Refine the scales of a calibrated torch.ao FX model in place with CPT-V's block-wise search.

    Call it between calibration and ``convert_fx``; the GraphModule stays what ``convert_fx`` expects, and the
    converted model carries the refined scales exactly.

    Args:
        prepared: the GraphModule from ``prepare_fx`` (observers) or ``prepare_qat_fx`` (FakeQuantize),
            already calibrated.
        calib_data: calibration images: a tensor ``(N, C, H, W)``, a list of tensors, or a DataLoader
            yielding tensors or ``(images, labels)``.
        config: search settings: a ``SearchConfig``, a preset name (``"fast"``), a mapping of settings, or ``None``
            for our default preset (``SearchConfig.resolve``).
        fp_model: the full-precision model to match; ``None`` uses ``prepared`` with quantization off (not
            possible once a refinement clipped its weights: refining such a model again needs ``fp_model``).
        blocks: module paths of the blocks, to skip automatic block discovery.
        target: what the search optimizes. ``"convert_fx"`` (default) simulates what ``convert_fx``'s kernels
            compute (the dtype's full range; a multiply by a number rescales exactly, where the reference model
            rounds the product again with its input's observer); ``"fake_quant"`` simulates the quantizers' own
            ranges (narrowed activation ranges such as 4-bit are then honoured, as FakeQuantize and the decomposed
            representation compute them, the second rounding of such products included).
        clamp_weights: for weight quantizers narrower than int8 (e.g. 4-bit), clip the weights onto the
            narrowed grid after the search, so that ``convert_fx`` (which quantizes with the full int8 range)
            holds exactly the low-bit integers that were optimized (with ``SearchConfig.gradient_clip_weights``,
            also at the searched scales before the gradient stage). The fake-quantized model does not change.

    Returns:
        A :class:`RefineResult`.

    Example:
        >>> prepared = prepare_fx(model, qconfig_mapping, example_inputs=(images[:1],))
        >>> for batch in images.split(100): prepared(batch)            # standard calibration
        >>> result = cptv_plugin.refine_fx(prepared, images, config=cptv_plugin.SearchConfig.fast())
        >>> quantized = convert_fx(prepared)                           # carries the refined scales
    """
    config = SearchConfig.resolve(config)
    if fp_model is None:
        _refuse_clipped_reference(prepared)
    session = FxSession(prepared, blocks=blocks, target=target, clamp_weights=clamp_weights, roles=config.roles,
                        search_outside_blocks=config.search_outside_blocks)
    return run_refinement(session, calib_data, config, fp_model)


def _refuse_clipped_reference(prepared: fx.GraphModule) -> None:
    """A model whose low-bit weights an earlier commit clipped is, with quantization off, no longer the float model a
    refinement must match. The commit notes what it clipped in ``prepared.meta``, which ``copy.deepcopy`` keeps
    (``torch.save`` cannot pickle a prepared model at all: torch.ao's qconfig factories are local functions)."""
    clamped = getattr(prepared, "meta", {}).get(CLAMPED_WEIGHTS)
    if clamped:
        raise ValueError(
            f"this model was refined before and its low-bit weights were clipped onto their narrowed grid "
            f"(clamp_weights=True; {len(clamped)} weights, e.g. {clamped[0]}), so with quantization off it no longer "
            "computes the full-precision model, the reference a refinement matches: pass fp_model=<the float "
            "model> to refine it again, or refine a fresh prepare_fx copy of the float model")


def _eight_bit_range(quantizer) -> bool:
    """Whether an observer, FakeQuantize or handle spans more than 7 bits (``quant_max - quant_min > 127``)."""
    return quantizer.quant_max - quantizer.quant_min > 127


def _saturating_int8_kernels() -> bool:
    """Whether convert_fx's int8 Linear/Conv kernels here saturate products of full-range 8-bit operands:
    fbgemm (torch.ao's x86 and fbgemm engines) on an x86 CPU without VNNI."""
    vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: True)  # private in torch 2.x: assume VNNI without it
    return torch.backends.quantized.engine in ("x86", "fbgemm") and not vnni()
