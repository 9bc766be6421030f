"""Structural identity of graph segments, so that identical blocks share one compiled graph.

The twelve blocks of a ViT are twelve segments with the same graph and differently named, identically shaped
parameters. ``torch.compile`` traces each segment's own generated code, so every block paid dynamo's and AOT's
tracing again (about 60 s of an 85 s DeiT-T search on the H100). :func:`segment_structure` gives a key that is
equal exactly when two segments compute the same function of their inputs and tensors, and the tensors in a
matching order: one compiled copy of the segment then serves every block, its tensors refreshed from the block's
own before each call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from .handles import get_attribute

__all__ = ["segment_structure"]

_SIMPLE = (int, float, bool, str, type(None), torch.dtype, torch.qscheme, torch.device, torch.memory_format)


class _Ref:
    """A node argument, by position in the segment (its name differs from block to block)."""

    def __init__(self, index: int):
        self.index = index

    def __repr__(self) -> str:
        return f"%{self.index}"


def _is_simple(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_simple(v) for v in value)
    return isinstance(value, _SIMPLE)


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return False


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]


def _module_key(module: nn.Module) -> tuple:
    """Types and plain attributes (ranges, axes, flags, eps, ...) of every submodule, and the shape, dtype and
    device of every tensor: what the compiled code may have baked in as constants or guards."""
    modules = []
    for path, sub in module.named_modules(remove_duplicate=False):
        # private ones too: ModelOpt keeps bit widths, axes and enabled flags as ``_num_bits``, ``_disabled``, ...
        constants = tuple(sorted((k, repr(v)) for k, v in vars(sub).items() if _is_simple(v)))
        modules.append((path, type(sub).__qualname__, type(sub).__module__, constants))
    tensors = tuple((name, tuple(t.shape), t.dtype, t.device.type, t.requires_grad)
                    for name, t in _named_tensors(module))
    return tuple(modules), tensors


def segment_structure(segment: fx.GraphModule) -> tuple[str, list[torch.Tensor]] | None:
    """``(key, tensors)``: segments with equal keys compute the same function of (inputs, tensors), with
    ``tensors`` in corresponding order. ``None`` when the segment holds something this cannot compare."""
    index: dict[fx.Node, int] = {}
    attributes: list[str] = []
    nodes = []
    for node in segment.graph.nodes:
        index[node] = len(index)
        target: Any = node.target
        if node.op == "placeholder":
            target = "input"  # named after the value it receives, which differs from block to block
        elif node.op in ("get_attr", "call_module"):
            if target not in attributes:
                attributes.append(target)
            target = f"attribute {attributes.index(target)}"
        elif node.op == "call_function":
            target = (getattr(target, "__qualname__", repr(target)), id(target))  # the same object in every block
        arguments = fx.node.map_arg((node.args, node.kwargs), lambda n: _Ref(index[n]))
        if _holds_tensor(arguments):  # a constant tensor's repr is abridged: not a safe comparison
            return None
        nodes.append((node.op, target, repr(arguments)))
    keys, tensors = [], []
    for target in attributes:
        value = get_attribute(segment, target)
        if isinstance(value, nn.Module):
            keys.append(_module_key(value))
            tensors.extend(t for _, t in _named_tensors(value))
        elif isinstance(value, torch.Tensor):
            keys.append(("tensor", tuple(value.shape), value.dtype, value.device.type))
            tensors.append(value)
        elif _is_simple(value):
            keys.append(("constant", repr(value)))
        else:
            return None
    return repr((nodes, keys)), tensors
