"""The block-wise evolutionary search of CPT-V (the paper's Algorithm 1), independent of any framework."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

import torch

from .config import SearchConfig
from .engine import Evaluator
from .handles import Group

__all__ = ["RefineResult", "evolutionary_search", "mutate"]

logger = logging.getLogger(__name__)

MIN_SCALE = 1e-8


@dataclass
class RefineResult:
    """What a refinement did.

    Attributes:
        initial_fitness: fitness of the scales the user gave us (calibration set, lower is better).
        final_fitness: fitness of the refined scales; never above ``initial_fitness``.
        history: one record per group visit: ``{"pass", "group", "fitness", "evaluations"}``.
        evaluations: number of fitness evaluations (each over the whole calibration set).
        seconds: wall time of the search.
        groups: names of the searched groups, in model order, with their number of scales.
        interrupted: the search was stopped early (Ctrl-C); the best scales found so far were kept.
        device: where the search ran (GPU name or "cpu"); precision: the arithmetic of candidate evaluations.
    """

    initial_fitness: float
    final_fitness: float
    history: list[dict] = field(default_factory=list)
    evaluations: int = 0
    seconds: float = 0.0
    groups: dict[str, int] = field(default_factory=dict)
    config: SearchConfig | None = None
    interrupted: bool = False
    device: str = "cpu"
    precision: str = "fp32"

    @property
    def improvement(self) -> float:
        """Relative fitness reduction, ``1 - final / initial``."""
        return 1.0 - self.final_fitness / self.initial_fitness if self.initial_fitness else 0.0

    def __str__(self) -> str:
        return (f"RefineResult(fitness {self.initial_fitness:.5f} -> {self.final_fitness:.5f}, "
                f"{self.evaluations} evaluations, {self.seconds:.1f} s"
                + (", interrupted" if self.interrupted else "") + ")")


def mutate(parent: torch.Tensor, gamma: float, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Eq. 2: every entry moves by an independent U(−γ, γ), additively (``"absolute"``, then abs() as the
    authors' code) or in log space (``"relative"``: multiply by exp(U(−γ, γ)))."""
    noise = (torch.rand(parent.shape, generator=generator, dtype=torch.float64) * 2 - 1) * gamma
    noise = noise.to(parent.device)
    if kind == "absolute":
        child = (parent.double() + noise).abs()
    else:
        child = parent.double() * noise.exp()
    return child.clamp_min(MIN_SCALE).to(parent.dtype)


def evolutionary_search(groups: list[Group], evaluator: Evaluator, config: SearchConfig) -> RefineResult:
    """Run K passes of the block-wise search over ``groups`` (in model order); scales are left at the best
    found. The current scales are always a member of the population, so the fitness never increases."""
    start_time = time.time()
    generator = torch.Generator().manual_seed(config.seed)
    rng = random.Random(config.seed)
    weight_bits = min((h.bits for g in groups for h in g.handles if h.role == "weight"), default=8)
    gamma = config.mutation_for_bits(weight_bits)
    order = list(range(len(groups)))
    if config.block_order == "reverse":
        order.reverse()
    best_fitness = evaluator(None)
    result = RefineResult(initial_fitness=best_fitness, final_fitness=best_fitness, config=config,
                          groups={g.name: len(g) for g in groups})
    logger.info("searching %d groups (%d scales), %d passes, gamma=%g (%s), initial fitness %.5f",
                len(groups), sum(result.groups.values()), config.passes, gamma, config.mutation_kind, best_fitness)
    try:
        from tqdm.auto import tqdm
        progress = tqdm(total=config.passes * len(order), desc="cpt-v search", disable=not config.progress,
                        unit="group")
    except ImportError:  # pragma: no cover - tqdm is a dependency
        progress = None
    try:
        for pass_index in range(config.passes):
            for group_index in order:
                group = groups[group_index]
                population: list[tuple[torch.Tensor, float]] = []
                try:
                    current = group.read()
                    population.append((current, best_fitness))
                    # the fast engine re-runs the suffix from the cached group input; the literal one everything
                    segment = group.segment if config.engine == "fast" else None
                    if segment is not None:
                        evaluator.advance(segment)
                    for _ in range(config.population - 1):
                        candidate = mutate(current, gamma, config.mutation_kind, generator)
                        group.set(candidate)
                        population.append((candidate, evaluator(segment)))
                    for _ in range(config.cycles):
                        drawn = rng.sample(range(len(population)), min(config.samples, len(population)))
                        parent = min(drawn, key=lambda i: population[i][1])
                        child = mutate(population[parent][0], gamma, config.mutation_kind, generator)
                        group.set(child)
                        population.append((child, evaluator(segment)))
                        worst = max(range(len(population)), key=lambda i: population[i][1])
                        population.pop(worst)
                finally:
                    # whatever happened, leave the group at the best member evaluated so far
                    if population:
                        best_vector, best_fitness = min(population, key=lambda member: member[1])
                        group.set(best_vector)
                result.history.append({"pass": pass_index, "group": group.name, "fitness": best_fitness,
                                       "evaluations": evaluator.evaluations})
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(fitness=f"{best_fitness:.4f}")
    except KeyboardInterrupt:
        logger.warning("search interrupted: keeping the best scales found so far")
        result.interrupted = True
    finally:
        if progress is not None:
            progress.close()
    result.final_fitness = best_fitness
    result.evaluations = evaluator.evaluations
    result.seconds = time.time() - start_time
    logger.info("search done: fitness %.5f -> %.5f in %.1f s (%d evaluations)", result.initial_fitness,
                result.final_fitness, result.seconds, result.evaluations)
    return result
