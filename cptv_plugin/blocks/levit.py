"""LeViT (timm ``Levit``, ``LevitDistilled``; the linear and the ``levit_conv`` variants).

One block per ``LevitBlock`` (attention with attention bias + residual MLP), in forward order through the
stages. The subsample-attention unit between two stages (``stages.<i>.downsample``: ``AttentionDownsample``
and its residual MLP) is one block of its own. The convolutional stem is the *prefix* group; the final
norm/pool and both classifier heads (``head``, ``head_dist``) are the *head* group.
"""

from __future__ import annotations

from . import BlockAdapter, ModelStructure, register_block_adapter, staged_blocks

_FAMILY = r"timm\.models\.levit\."


@register_block_adapter
class LevitAdapter(BlockAdapter):
    name = "levit"

    def matches(self, structure: ModelStructure) -> bool:
        return bool(self.blocks(structure))

    def blocks(self, structure: ModelStructure) -> list[str]:
        return staged_blocks(structure, "stages", _FAMILY + r"LevitBlock$", _FAMILY + r"LevitDownsample$")
