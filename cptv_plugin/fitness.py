"""Fitness functions: (quantized outputs, full-precision outputs) → scalar, lower is better.

Each is registered by name with :func:`register_fitness`; :class:`~cptv_plugin.SearchConfig` picks one by name.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

__all__ = ["register_fitness", "get_fitness", "list_fitness", "infonce", "infonce_batches", "mse", "cosine", "kl",
           "hessian"]


class Fitness(Protocol):
    def __call__(self, quantized: torch.Tensor, reference: torch.Tensor, *, temperature: float,
                 normalize: bool) -> torch.Tensor: ...


_REGISTRY: dict[str, Callable] = {}


def register_fitness(fn: Callable) -> Callable:
    """Register a fitness function under its name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def get_fitness(name: str) -> Callable:
    if name not in _REGISTRY:
        raise ValueError(f"unknown fitness {name!r}; choose from {list_fitness()}")
    return _REGISTRY[name]


def list_fitness() -> list[str]:
    return sorted(_REGISTRY)


def needs_negatives(name: str) -> bool:
    """Whether the fitness compares each image against the rest of its batch (needs batches of >= 2)."""
    return name == "infonce"


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.float().reshape(len(x), -1)


def infonce_batches(quantized: torch.Tensor, reference: torch.Tensor, *, temperature: float = 0.1,
                    normalize: bool = True, reference_normalized: bool = False) -> torch.Tensor:
    """InfoNCE of ``n`` batches at once: ``(n, B, ...)`` outputs → the ``n`` per-batch means. With
    ``reference_normalized`` the references are already L2-normalized (computed once, reused per evaluation)."""
    p, o = quantized.float().flatten(2), reference.float().flatten(2)
    if normalize:
        p = F.normalize(p, dim=-1)
        o = o if reference_normalized else F.normalize(o, dim=-1)
    logits = torch.bmm(p, o.transpose(1, 2)) / temperature
    count, size = logits.shape[:2]
    targets = torch.arange(size, device=logits.device).repeat(count)
    losses = F.cross_entropy(logits.reshape(count * size, size), targets, reduction="none")
    return losses.reshape(count, size).mean(1)


@register_fitness
def infonce(quantized: torch.Tensor, reference: torch.Tensor, *, temperature: float = 0.1,
            normalize: bool = True) -> torch.Tensor:
    """InfoNCE of the paper's Eq. 3: the full-precision output of the same image is the positive, those of
    the batch's other images are the negatives. Mean over the batch."""
    return infonce_batches(quantized[None], reference[None], temperature=temperature, normalize=normalize)[0]


@register_fitness
def mse(quantized: torch.Tensor, reference: torch.Tensor, **_) -> torch.Tensor:
    """Mean squared error between outputs."""
    return F.mse_loss(_flat(quantized), _flat(reference))


@register_fitness
def cosine(quantized: torch.Tensor, reference: torch.Tensor, **_) -> torch.Tensor:
    """1 − cosine similarity, averaged over images."""
    return (1 - F.cosine_similarity(_flat(quantized), _flat(reference), dim=-1)).mean()


@register_fitness
def kl(quantized: torch.Tensor, reference: torch.Tensor, **_) -> torch.Tensor:
    """KL(softmax(reference) || softmax(quantized)) of the logits, averaged over images."""
    log_q = F.log_softmax(_flat(quantized), dim=-1)
    log_p = F.log_softmax(_flat(reference), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


@register_fitness
def hessian(quantized: torch.Tensor, reference: torch.Tensor, **_) -> torch.Tensor:
    """PTQ4ViT's Hessian-guided metric at the logits, label-free: the squared logit error weighted by the squared
    gradient of the cross-entropy at the full-precision logits (the diagonal Fisher approximation of the task
    loss's Hessian), with the full-precision model's own top-1 as the label, since calibration images come
    unlabeled. Sum over classes, mean over images. An image the full-precision model predicts with certainty weighs
    nearly nothing: the metric is local, a second-order expansion around the full-precision output."""
    logits = _flat(reference)
    label = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    weight = (logits.softmax(-1) - label).square()
    return (weight * (_flat(quantized) - logits).square()).sum(-1).mean()
