"""Reference models trained by the project on Fashion-MNIST, built with timm constructors.

No model hub is reachable where this project is developed, so the reference models are the project's own:
timm architectures with small-image settings, trained by :mod:`cptv_plugin.train`. Each entry registers
itself with :func:`register_reference_model`, in the spirit of timm's ``@register_model``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

__all__ = [
    "register_reference_model",
    "list_reference_models",
    "create_reference_model",
    "load_reference_model",
    "CHECKPOINT_DIR",
    "build_model",
]

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
_REGISTRY: dict[str, Callable[[], nn.Module]] = {}


def register_reference_model(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """Register a constructor under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_reference_models() -> list[str]:
    """Names of every registered reference model, sorted."""
    return sorted(_REGISTRY)


def create_reference_model(name: str) -> nn.Module:
    """Build a reference model with random weights (for training, or to load a checkpoint into)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown reference model {name!r}; known: {', '.join(list_reference_models())}")
    return _REGISTRY[name]()


def load_reference_model(name: str, checkpoint: str | Path | None = None) -> nn.Module:
    """Build a reference model and load its trained weights (float32, eval mode).

    Args:
        name: a name from :func:`list_reference_models`.
        checkpoint: a file written by :mod:`cptv_plugin.train`; defaults to the one shipped in the package.
    """
    path = Path(checkpoint) if checkpoint is not None else CHECKPOINT_DIR / f"{name}.pt"
    if not path.exists():
        raise FileNotFoundError(
            f"no checkpoint for {name!r} at {path}; train one with "
            f"`python -m cptv_plugin.train --model {name} --out {path}`"
        )
    model = create_reference_model(name)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({key: value.float() for key, value in payload["state_dict"].items()})
    return model.eval()


@register_reference_model
def fmnist_vit_tiny() -> nn.Module:
    """A 4-block ViT (width 64, 4 heads, 4×4 patches; about 0.14 M parameters) small enough for CPU tests."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0
    )


@register_reference_model
def fmnist_deit_tiny() -> nn.Module:
    """A DeiT-Tiny-like ViT: 12 blocks, width 192, 3 heads, 4×4 patches on 28×28 images (5.4 M parameters)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0
    )


@register_reference_model
def fmnist_swin_tiny() -> nn.Module:
    """A Swin-like model: 2×2 patches, 7×7 windows, two stages of 2 and 4 blocks (width 64 → 128; 0.93 M)."""
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        img_size=28, patch_size=2, in_chans=1, num_classes=10, window_size=7, embed_dim=64, depths=(2, 4),
        num_heads=(2, 4), mlp_ratio=4.0,
    )


@register_reference_model
def fmnist_levit() -> nn.Module:
    """A LeViT-like model (LevitDistilled): a stride-4 conv stem, two stages (2 and 3 blocks, widths 128 and 192)
    joined by a subsample-attention block, residual MLPs and the distillation head."""
    from timm.models.levit import ConvNorm, LevitDistilled

    stem = nn.Sequential(ConvNorm(1, 64, 3, stride=2, padding=1), nn.Hardswish(),
                         ConvNorm(64, 128, 3, stride=2, padding=1))
    return LevitDistilled(
        img_size=28, in_chans=1, num_classes=10, embed_dim=(128, 192), key_dim=16, depth=(2, 3),
        num_heads=(4, 6), stem_backbone=stem, stem_stride=4,
    )


def build_model(spec: str | Callable[..., nn.Module], **kwargs) -> nn.Module:
    """A model from a constructor spec: ``"timm:deit_tiny_patch16_224"`` (``pretrained`` defaults to False),
    ``"cptv:fmnist_vit_tiny"`` (a reference model with its trained weights), ``"package.module:function"``,
    or a callable. ``kwargs`` go to the constructor."""
    if callable(spec):
        return spec(**kwargs)
    prefix, sep, name = spec.partition(":")
    if not sep or not name:
        raise ValueError(f"model spec must look like 'timm:NAME', 'cptv:NAME' or 'module:function', got {spec!r}")
    if prefix == "timm":
        import timm

        kwargs.setdefault("pretrained", False)
        return timm.create_model(name, **kwargs)
    if prefix == "cptv":
        return load_reference_model(name, **kwargs)
    import importlib

    try:
        constructor = getattr(importlib.import_module(prefix), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import the model constructor {spec!r}: {error}") from error
    return constructor(**kwargs)
