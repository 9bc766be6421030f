"""Block discovery: how a model splits into the groups of scales that the search moves together.

Adapters register themselves with :func:`register_block_adapter` (one file per family, as timm's models).
Each looks at a :class:`ModelStructure` (module paths and classes, from an eager model or from the
``nn_module_stack`` metadata of a traced graph) and returns the module paths of the blocks, in forward order.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from torch import nn

__all__ = [
    "ModelStructure",
    "BlockAdapter",
    "UnsupportedModelError",
    "register_block_adapter",
    "list_block_adapters",
    "discover_blocks",
    "indexed_children",
    "staged_blocks",
]


class UnsupportedModelError(ValueError):
    """No block adapter recognises the model."""


@dataclass
class ModelStructure:
    """Module paths mapped to their classes' qualified names, in first-seen (forward) order."""

    modules: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_module(cls, model: nn.Module) -> "ModelStructure":
        return cls({path: _qualname(type(m)) for path, m in model.named_modules() if path})

    @classmethod
    def from_graph_module(cls, graph_module) -> "ModelStructure":
        modules: dict[str, str] = {}
        for node in graph_module.graph.nodes:
            for entry in node.meta.get("nn_module_stack", {}).values():
                path, kind = entry if isinstance(entry, tuple) else (entry, None)
                path = _normalize_path(path)
                if path and path not in modules:
                    modules[path] = _qualname(kind) if isinstance(kind, type) else str(kind)
        if not modules:  # no tracing metadata: fall back to the submodules the graph module kept
            return cls.from_module(graph_module)
        return cls(modules)

    def children_matching(self, pattern: str) -> list[str]:
        regex = re.compile(pattern)
        return [p for p in self.modules if regex.fullmatch(p)]


def _qualname(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _normalize_path(path: str) -> str:
    # torch.export writes "L['self'].blocks.0" style or "blocks.0"; keep the plain dotted path
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.replace("._modules['", ".").replace("']", "")


class BlockAdapter(ABC):
    """Says whether it knows a model, and which module paths are its blocks (forward order)."""

    name: str = "adapter"
    #: a fallback adapter is tried only after every other registered adapter declined the model
    fallback: bool = False

    @abstractmethod
    def matches(self, structure: ModelStructure) -> bool: ...

    @abstractmethod
    def blocks(self, structure: ModelStructure) -> list[str]: ...


_ADAPTERS: dict[str, BlockAdapter] = {}


def register_block_adapter(cls: type[BlockAdapter]) -> type[BlockAdapter]:
    """Class decorator: register an adapter (an instance is created once; adapters are tried in order)."""
    _ADAPTERS[cls.name] = cls()
    return cls


def list_block_adapters() -> list[str]:
    return list(_ADAPTERS)


def indexed_children(structure: ModelStructure, parent: str, class_pattern: str | None = None) -> list[str]:
    """Paths ``parent.0``, ``parent.1``, … (sorted by index), optionally only those whose class matches."""
    found = []
    for path in structure.children_matching(re.escape(parent) + r"\.\d+"):
        if class_pattern is None or re.search(class_pattern, structure.modules[path]):
            found.append(path)
    return sorted(found, key=lambda p: int(p.rsplit(".", 1)[1]))


def staged_blocks(structure: ModelStructure, stages: str, block_class: str, downsample_class: str) -> list[str]:
    """Blocks of a staged model (Swin, LeViT): for each ``<stages>.<i>``, its ``downsample`` when its class
    matches ``downsample_class`` (an Identity does not), then ``<stages>.<i>.blocks.<j>`` whose class matches
    ``block_class``; stages and blocks in index order (their forward order)."""
    found = []
    for stage in indexed_children(structure, stages):
        downsample = f"{stage}.downsample"
        if re.search(downsample_class, structure.modules.get(downsample, "")):
            found.append(downsample)
        found += indexed_children(structure, f"{stage}.blocks", block_class)
    return found if any(".blocks." in path for path in found) else []


def discover_blocks(structure: ModelStructure, blocks: list[str] | None = None) -> tuple[str, list[str]]:
    """Return ``(adapter name, block paths)``. ``blocks`` (explicit module paths) skips the adapters."""
    if blocks is not None:
        missing = [b for b in blocks if b not in structure.modules]
        if missing:
            raise UnsupportedModelError(f"block paths not found in the model: {missing}")
        return "explicit", list(blocks)
    ordered = sorted(_ADAPTERS.values(), key=lambda adapter: adapter.fallback)  # stable: fallbacks last
    for adapter in ordered:
        if adapter.matches(structure):
            found = adapter.blocks(structure)
            if found:
                return adapter.name, found
    raise UnsupportedModelError(
        "no block adapter recognises this model (known: " + ", ".join(list_block_adapters()) + "). "
        "Pass the block module paths explicitly (blocks=['layers.0', 'layers.1', ...]) or register an adapter: "
        "subclass cptv_plugin.BlockAdapter, decorate it with @cptv_plugin.register_block_adapter "
        "(see the README, 'Adding an adapter for a new architecture')."
    )


from . import generic, levit, swin, vit  # noqa: E402,F401  (registers the built-in adapters)
