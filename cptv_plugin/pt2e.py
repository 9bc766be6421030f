"""torchao PT2E (placeholder until refine_pt2e lands): detection only."""

from __future__ import annotations

from torch import nn


def is_pt2e_prepared(model: nn.Module) -> bool:
    return False
