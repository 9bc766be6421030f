"""Turn whatever calibration data the user has into a list of checked, equally sized batches."""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["CalibrationError", "calibration_batches", "calibration_images", "split_batches"]


class CalibrationError(ValueError):
    """The calibration data cannot be used as given."""


def _images_of(item) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return item[0]  # (images, labels): labels are ignored
    if isinstance(item, dict):
        for key in ("image", "images", "pixel_values", "input"):
            if key in item:
                return item[key]
    raise CalibrationError(
        f"calibration data yielded a {type(item).__name__}; expected a tensor of images, "
        "or (images, labels) tuples as a DataLoader gives"
    )


def calibration_batches(data, batch_size: int, *, min_batch: int = 1,
                        example_shape: tuple[int, ...] | None = None) -> list[torch.Tensor]:
    """Collect ``data`` into float batches of ``batch_size`` images (the last one may be smaller).

    Args:
        data: a tensor ``(N, ...)``, a list of tensors, or an iterable / DataLoader yielding tensors or
            ``(images, labels)`` tuples.
        batch_size: images per batch; the fitness compares images inside one batch.
        min_batch: the smallest batch the fitness can use (2 for InfoNCE, which needs negatives).
        example_shape: the per-image shape the model expects, if known; checked.
    """
    if batch_size < min_batch:
        raise CalibrationError(f"batch_size={batch_size} is too small: the fitness needs at least {min_batch}")
    return split_batches(calibration_images(data, min_batch=min_batch, example_shape=example_shape), batch_size,
                         min_batch)


def split_batches(images: torch.Tensor, batch_size: int, min_batch: int = 1) -> list[torch.Tensor]:
    """``images`` in batches of ``batch_size``; a last batch below ``min_batch`` joins the one before."""
    batches = list(images.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < min_batch:
        batches[-2] = torch.cat([batches[-2], batches.pop()])
    return batches


def calibration_images(data, *, min_batch: int = 1, example_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """``data`` (see :func:`calibration_batches`) as one checked float tensor ``(N, ...)``."""
    if isinstance(data, torch.Tensor):
        images = data
    elif isinstance(data, Iterable):
        parts = []
        for item in data:
            part = _images_of(item)
            parts.append(part.unsqueeze(0) if example_shape is not None and part.dim() == len(example_shape) else part)
        if not parts:
            raise CalibrationError("the calibration set is empty: pass at least two images")
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) > 1:
            raise CalibrationError(f"calibration images have different shapes: {sorted(shapes)}")
        images = torch.cat(parts)
    else:
        raise CalibrationError(
            f"calibration data must be a tensor or an iterable of tensors, not {type(data).__name__}")
    if images.dim() < 2 or len(images) == 0:
        raise CalibrationError(f"the calibration set is empty or not batched (shape {tuple(images.shape)})")
    if not images.is_floating_point():
        raise CalibrationError(
            f"calibration images must be floating point, got {images.dtype}; convert and normalize them first")
    if example_shape is not None and tuple(images.shape[1:]) != tuple(example_shape):
        raise CalibrationError(
            f"calibration images have shape {tuple(images.shape[1:])} but the model expects {tuple(example_shape)}"
        )
    finite = torch.isfinite(images)
    if not bool(finite.all()):
        bad = int((~finite.reshape(len(images), -1).all(dim=1)).sum())
        raise CalibrationError(f"{bad} calibration image(s) contain NaN or Inf values; remove or fix them")
    if len(images) < min_batch:
        raise CalibrationError(
            f"the calibration set has {len(images)} image(s) but the fitness needs batches of at least {min_batch} "
            "(InfoNCE uses the other images of a batch as negatives): pass more images or use fitness='mse'"
        )
    return images
