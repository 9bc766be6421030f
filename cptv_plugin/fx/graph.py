"""Split a torch.fx graph into a chain of segments at block boundaries, from ``nn_module_stack`` metadata."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx

from ..engine import Segment, SegmentedModel

__all__ = ["assign_groups", "split_graph", "GraphSplitError"]

logger = logging.getLogger(__name__)

_FREE_OPS = ("placeholder", "get_attr", "output")


class GraphSplitError(RuntimeError):
    """The graph's node order does not follow the blocks, so it cannot be cut between them."""


def _stack_paths(node: fx.Node) -> list[str]:
    from ..blocks import _normalize_path

    paths = []
    for entry in node.meta.get("nn_module_stack", {}).values():
        path = entry[0] if isinstance(entry, tuple) else entry
        paths.append(_normalize_path(str(path)))
    return paths


def assign_groups(graph: fx.Graph, block_paths: list[str], module_path_of=None,
                  is_inserted=None) -> dict[fx.Node, int]:
    """Group of every computing node: 0 = before the first block (prefix), ``i + 1`` = block ``i``,
    ``len(block_paths) + 1`` = after the last block (head).

    A node belongs to a block when its module stack (or, for ``call_module`` nodes, ``module_path_of(node)``)
    lies inside the block. Nodes that quantization inserted (``is_inserted(node)``: observers, fake
    quantizers) follow the node they observe; other nodes outside every block (top-level ops) join the
    running position: the prefix before the first block, the earlier block between two blocks, the head after
    the last block.
    """
    n_blocks = len(block_paths)
    prefixes = [(p, i + 1) for i, p in enumerate(block_paths)]

    def block_of(node: fx.Node) -> int | None:
        paths = _stack_paths(node)
        if node.op == "call_module" and module_path_of is not None:
            own = module_path_of(node)
            if own:
                paths.append(own)
        for path in paths:
            for prefix, group in prefixes:
                if path == prefix or path.startswith(prefix + "."):
                    return group
        return None

    nodes = list(graph.nodes)
    direct = {node: block_of(node) for node in nodes if node.op not in _FREE_OPS}
    last_block_node = max((i for i, n in enumerate(nodes) if direct.get(n) == n_blocks), default=-1)
    groups: dict[fx.Node, int] = {}
    running = 0
    for index, node in enumerate(nodes):
        if node.op == "placeholder":
            groups[node] = 0
            continue
        if node.op in _FREE_OPS:
            continue
        group = direct[node]
        if group is None:
            inputs = [groups[a] for a in node.all_input_nodes if a in groups and a.op != "placeholder"]
            if is_inserted is not None and is_inserted(node):
                group = max(inputs, default=running)
            elif index > last_block_node and n_blocks:
                group = n_blocks + 1
            else:
                group = running
        groups[node] = group
        running = max(running, group)
    return groups


def split_graph(graph_module: fx.GraphModule, groups: dict[fx.Node, int]) -> tuple[SegmentedModel, dict[int, int]]:
    """Cut ``graph_module`` into one segment per non-empty group; return the chain and, per group, the
    index of the segment where that group's nodes start (groups with no nodes map to the next segment)."""
    nodes = list(graph_module.graph.nodes)
    computing = [n for n in nodes if n.op not in _FREE_OPS]
    order = [groups[n] for n in computing]
    if any(b < a for a, b in zip(order, order[1:])):
        culprit = next(computing[i + 1] for i, (a, b) in enumerate(zip(order, order[1:])) if b < a)
        raise GraphSplitError(f"node {culprit.name} of group {groups[culprit]} comes after a later group's nodes")
    seg_groups = sorted(set(order))
    segment_of = {n: seg_groups.index(groups[n]) for n in computing}
    output_node = next(n for n in nodes if n.op == "output")
    placeholders = [n for n in nodes if n.op == "placeholder"]

    def producer(n: fx.Node) -> int:
        return segment_of.get(n, -1)  # placeholders: -1; get_attr nodes are copied where used

    segments: list[Segment] = []
    for s, group in enumerate(seg_groups):
        members = [n for n in computing if segment_of[n] == s]
        last = s == len(seg_groups) - 1
        consumers = members + ([output_node] if last else [])
        inputs: list[fx.Node] = []
        for n in consumers:
            for a in n.all_input_nodes:
                if a.op != "get_attr" and producer(a) < s and a not in inputs:
                    inputs.append(a)
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for a in inputs:
            env[a] = graph.placeholder(a.name)

        def lookup(a: fx.Node) -> fx.Node:
            if a not in env:
                if a.op != "get_attr":
                    raise GraphSplitError(f"value {a.name} is used before it is computed")
                env[a] = graph.node_copy(a)
            return env[a]

        for n in members:
            env[n] = graph.node_copy(n, lookup)
        if last:
            graph.output(fx.node.map_arg(output_node.args[0], lookup))
            outputs = None
        else:
            later = [n for n in members if any(producer(u) > s or u.op == "output" for u in n.users)]
            outputs = [n.name for n in later]
            graph.output(tuple(env[n] for n in later))
        module = fx.GraphModule(graph_module, graph)
        segments.append(Segment(module, [a.name for a in inputs], outputs))

    # read from the graph once, here: inside a compiled forward, touching fx.Node breaks the graph (dynamo skips fx)
    first_input = placeholders[0].name if placeholders else None
    inputs_after_first = [(node.name, node.target, tuple(node.args[:1])) for node in placeholders[1:]]

    def initial_env(images: torch.Tensor) -> dict[str, Any]:
        env: dict[str, Any] = {first_input: images} if first_input is not None else {}
        for name, target, default in inputs_after_first:
            if not default:
                raise ValueError(f"the model's input {target!r} has no default; only the first input is fed")
            env[name] = default[0]
        return env

    group_to_segment = {}
    for group in range(max(seg_groups) + 1 if seg_groups else 1):
        following = [i for i, g in enumerate(seg_groups) if g >= group]
        group_to_segment[group] = following[0] if following else len(seg_groups) - 1
    return SegmentedModel(segments, initial_env), group_to_segment
