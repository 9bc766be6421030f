"""Fallback for models no adapter knows: the innermost run of repeated blocks.

A model whose blocks are the numbered children of ``nn.ModuleList`` / ``nn.Sequential`` containers (at least two
children of one class that hold a ``Linear`` or ``Conv2d``, named ``0``, ``1``, ... or one name with a number,
as torchvision's ``encoder.layers.encoder_layer_0``) gets those children as blocks, in forward order; containers
nested in such a child (e.g. the blocks of a stage) win over the outer one. It is tried after every registered
adapter, logs what it chose, and declines models without such a run (then pass ``blocks=[...]``). Models it
serves this way (tested): torchvision's ``VisionTransformer`` and ``SwinTransformer``; Hugging Face's ViT, Swin and
DeiT (``vit.layers.0``; ``vit.encoder.layer.0`` before transformers 5).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict

from . import BlockAdapter, ModelStructure, register_block_adapter

logger = logging.getLogger(__name__)

_CONTAINER = re.compile(r"torch\.nn\.modules\.container\.(ModuleList|Sequential)$")
# torch's layers, and the quantized ones ModelOpt (modelopt...QuantLinear) and pytorch-quantization put in their place
_COMPUTE = re.compile(r"(torch\.nn\.modules\.(linear\.Linear|conv\.Conv[12]d)|\.Quant(Linear|Conv[12]d))$")
_NUMBERED = re.compile(r"(?:[A-Za-z_]\w*?_?)?\d+")  # "3", "encoder_layer_3", "block3"


@register_block_adapter
class GenericAdapter(BlockAdapter):
    name = "generic"
    fallback = True

    def matches(self, structure: ModelStructure) -> bool:
        return bool(self.blocks(structure))

    def blocks(self, structure: ModelStructure) -> list[str]:
        # (container, name without its number) -> the children so named: one candidate run each
        children: dict[tuple[str, str], list[str]] = defaultdict(list)
        for path, kind in structure.modules.items():
            parent, _, last = path.rpartition(".")
            # a ModuleList that forward iterates never runs itself, so a traced graph does not record it
            if _NUMBERED.fullmatch(last) and (parent not in structure.modules or
                                              _CONTAINER.search(structure.modules[parent])):
                children[parent, last.rstrip("0123456789")].append(path)
        runs = []
        for run, members in children.items():
            kinds = {structure.modules[m] for m in members}
            has_compute = all(any(_COMPUTE.search(k) for p, k in structure.modules.items()
                                  if p.startswith(m + ".")) for m in members)
            if len(members) >= 2 and len(kinds) == 1 and has_compute:
                runs.append(run)
        # innermost runs only: drop a run when another run lies inside one of its children
        innermost = [r for r in runs if not any(o != r and o[0].startswith(r[0] + ".") for o in runs)]
        order = {path: index for index, path in enumerate(structure.modules)}
        found = sorted((m for r in innermost for m in children[r]), key=order.__getitem__)
        if found:
            logger.info("generic block adapter: %d blocks from %s", len(found), ", ".join(r[0] for r in innermost))
        return found
