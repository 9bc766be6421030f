"""Separable CMA-ES (Ros & Hansen, 2008) on a group's log-scales: the issue's alternative to the paper's tournament.

One generation per group visit: ``λ`` candidates ``m + σ·√C·z`` (``z`` standard normal, ``C`` diagonal) in log
space, ranked by the fitness, the mean moved to the weighted recombination of the best half, then the step size
(cumulative step-size adaptation) and the diagonal covariance updated. The state lives on across passes, so a group
visited ten times gets ten generations. The diagonal form costs O(n) per candidate: a block holds hundreds to
thousands of scales, far too many for a full covariance.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SepCMA"]


class SepCMA:
    """Sep-CMA-ES state of one group, in ``log(scale)`` space (float64, on the CPU).

    ``sigma``: the initial step size (the standard deviation of one coordinate's move); ``population``: λ."""

    def __init__(self, log_mean: torch.Tensor, sigma: float, population: int):
        n = log_mean.numel()
        self.mean = log_mean.detach().double().cpu().reshape(-1).clone()
        self.sigma = float(sigma)
        self.variances = torch.ones(n, dtype=torch.float64)  # diagonal of C
        self.path_sigma = torch.zeros(n, dtype=torch.float64)
        self.path_c = torch.zeros(n, dtype=torch.float64)
        self.generation = 0
        self.population = population
        mu = max(1, population // 2)
        raw = torch.tensor([math.log(mu + 0.5) - math.log(i + 1) for i in range(mu)], dtype=torch.float64)
        self.weights = raw / raw.sum()
        mu_eff = float(1.0 / (self.weights ** 2).sum())
        self.c_sigma = (mu_eff + 2) / (n + mu_eff + 5)
        self.d_sigma = 1 + 2 * max(0.0, math.sqrt((mu_eff - 1) / (n + 1)) - 1) + self.c_sigma
        self.c_c = (4 + mu_eff / n) / (n + 4 + 2 * mu_eff / n)
        # the separable variant learns a diagonal: its rates may be (n + 2) / 3 times the full matrix's
        c_1 = 2 / ((n + 1.3) ** 2 + mu_eff)
        c_mu = min(1 - c_1, 2 * (mu_eff - 2 + 1 / mu_eff) / ((n + 2) ** 2 + mu_eff))
        self.c_1 = min(1.0, c_1 * (n + 2) / 3)
        self.c_mu = min(1.0 - self.c_1, c_mu * (n + 2) / 3)
        self.chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))  # E||N(0, I)||

    def ask(self, count: int, generator: torch.Generator) -> list[torch.Tensor]:
        """``count`` candidate log-scale vectors (float64, CPU)."""
        z = torch.randn((count, self.mean.numel()), generator=generator, dtype=torch.float64)
        return list(self.mean + self.sigma * self.variances.sqrt() * z)

    def tell(self, candidates: list[torch.Tensor], fitnesses: list[float]) -> None:
        """Update the state from ``candidates`` (as :meth:`ask` gave them) and their fitness (lower is better).
        Uses the best ``len(weights)`` of them; fewer candidates than that use fewer, renormalized weights."""
        order = sorted(range(len(candidates)), key=lambda i: fitnesses[i])
        weights = self.weights[: len(order)]
        weights = weights / weights.sum()
        mu_eff = float(1.0 / (weights ** 2).sum())
        steps = torch.stack([(candidates[i] - self.mean) / self.sigma for i in order[: len(weights)]])
        step = (weights[:, None] * steps).sum(0)
        self.mean = self.mean + self.sigma * step
        self.path_sigma = (1 - self.c_sigma) * self.path_sigma + \
            math.sqrt(self.c_sigma * (2 - self.c_sigma) * mu_eff) * step / self.variances.sqrt()
        self.generation += 1
        norm = float(self.path_sigma.norm())
        # h_sigma: the covariance path only accumulates while the step-size path is not unusually long
        h_sigma = norm / math.sqrt(1 - (1 - self.c_sigma) ** (2 * self.generation)) < \
            (1.4 + 2 / (self.mean.numel() + 1)) * self.chi_n
        self.path_c = (1 - self.c_c) * self.path_c + \
            float(h_sigma) * math.sqrt(self.c_c * (2 - self.c_c) * mu_eff) * step
        rank_mu = (weights[:, None] * steps.square()).sum(0)
        self.variances = (1 - self.c_1 - self.c_mu) * self.variances + self.c_1 * self.path_c.square() + \
            self.c_mu * rank_mu
        self.sigma *= math.exp(self.c_sigma / self.d_sigma * (norm / self.chi_n - 1))

    def state_dict(self) -> dict:
        return {"mean": self.mean, "sigma": self.sigma, "variances": self.variances, "path_sigma": self.path_sigma,
                "path_c": self.path_c, "generation": self.generation}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.sigma = state["mean"].double(), float(state["sigma"])
        self.variances, self.path_sigma = state["variances"].double(), state["path_sigma"].double()
        self.path_c, self.generation = state["path_c"].double(), int(state["generation"])
