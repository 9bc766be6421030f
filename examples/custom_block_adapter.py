"""Adding a block adapter for a new architecture: a complete, runnable example.

The model below is a small transformer of our own whose blocks live in ``self.layers`` (not timm's
``blocks``), so no built-in adapter knows it. Registering an adapter takes a dozen lines.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import cptv_plugin
from cptv_plugin import BlockAdapter, ModelStructure, register_block_adapter
from cptv_plugin.blocks import indexed_children
from cptv_plugin.qconfigs import fx_qconfig_mapping


class MyLayer(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mix = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        x = x + self.mix(self.norm(x))
        return x + self.mlp(x)


class MyTransformer(nn.Module):
    def __init__(self, width: int = 32, depth: int = 3, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(28, width)  # one token per image row
        self.layers = nn.ModuleList(MyLayer(width) for _ in range(depth))
        self.classifier = nn.Linear(width, classes)

    def forward(self, images):
        x = self.embed(images.flatten(1, 2))  # (N, 28, 28) rows as tokens
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x.mean(1))


@register_block_adapter
class MyTransformerAdapter(BlockAdapter):
    """Each ``layers.<i>`` of a MyTransformer is one block."""

    name = "my-transformer"

    def matches(self, structure: ModelStructure) -> bool:
        return bool(indexed_children(structure, "layers", r"\.MyLayer$"))

    def blocks(self, structure: ModelStructure) -> list[str]:
        return indexed_children(structure, "layers", r"\.MyLayer$")


def main(config: cptv_plugin.SearchConfig | None = None) -> cptv_plugin.RefineResult:
    torch.manual_seed(0)
    model = MyTransformer().eval()
    images = torch.randn(200, 1, 28, 28)
    prepared = prepare_fx(model, fx_qconfig_mapping("W4A8"), example_inputs=(images[:1],))
    with torch.no_grad():
        prepared(images)
    # this untrained toy is already within the lossless check's KL of its float model at W4A8, which would leave
    # it as it is: lossless_kl=0 refines it anyway, to show the adapter's groups at work
    config = config or cptv_plugin.SearchConfig.fast(progress=False, lossless_kl=0.0)
    result = cptv_plugin.refine_fx(prepared, images, config=config)
    print(result, list(result.groups))
    convert_fx(prepared)
    return result


if __name__ == "__main__":
    main()
