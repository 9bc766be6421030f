"""Swin Transformer (timm ``SwinTransformer``, ``SwinTransformerV2``, ``SwinTransformerV2Cr``).

One block per Swin transformer block (windowed or shifted-window attention + MLP), in forward order. The
patch-merging layer at the start of a stage (``layers.<i>.downsample``: LayerNorm + Linear reduction) is a
block of its own: it sits between two stages, its scales act on a tensor of a new shape, and giving it its own
visit keeps it from being searched together with attention scales of very different size.
"""

from __future__ import annotations

from . import BlockAdapter, ModelStructure, register_block_adapter, staged_blocks

_FAMILY = r"timm\.models\.swin_transformer(_v2|_v2_cr)?\."


@register_block_adapter
class SwinAdapter(BlockAdapter):
    name = "swin"

    def matches(self, structure: ModelStructure) -> bool:
        return bool(self.blocks(structure))

    def blocks(self, structure: ModelStructure) -> list[str]:
        for container in ("layers", "stages"):
            found = staged_blocks(structure, container, _FAMILY + r"SwinTransformer(V2|V2Cr)?Block$",
                                  _FAMILY + r"PatchMerging$")
            if found:
                return found
        return []
