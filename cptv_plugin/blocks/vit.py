"""ViT / DeiT (timm ``VisionTransformer`` and subclasses): each ``blocks.<i>`` is one block.

Scales outside the blocks form two extra groups: *prefix* (patch embedding, class token and position
embedding) and *head* (final norm, pooling, classifier; DeiT's distillation head too).
"""

from __future__ import annotations

from . import BlockAdapter, ModelStructure, indexed_children, register_block_adapter

_BLOCK_CLASSES = r"timm\.models\.(vision_transformer|deit|eva|beit|cait|vision_transformer_relpos)\."


@register_block_adapter
class VitAdapter(BlockAdapter):
    name = "vit"

    def matches(self, structure: ModelStructure) -> bool:
        return bool(indexed_children(structure, "blocks", _BLOCK_CLASSES))

    def blocks(self, structure: ModelStructure) -> list[str]:
        return indexed_children(structure, "blocks", _BLOCK_CLASSES)
