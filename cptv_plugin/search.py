"""The block-wise evolutionary search of CPT-V (the paper's Algorithm 1), independent of any framework."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ._io import atomic_path
from .cma import SepCMA
from .config import SearchConfig
from .distributed import Shard
from .engine import Evaluator
from .granularity import visit_plan
from .handles import Group, set_groups
from .starts import seed_vectors

__all__ = ["RefineResult", "evolutionary_search", "mutate", "CheckpointMismatchError"]

logger = logging.getLogger(__name__)

MIN_SCALE = 1e-8


@dataclass
class RefineResult:
    """What a refinement did.

    Attributes:
        initial_fitness: fitness of the scales the user gave us (calibration set, lower is better).
        final_fitness: fitness of the refined scales. The search never ends above the fitness of the scales it
            started from (the given ones, or the start candidate ``start`` names); the gradient stage lowers its
            own ``gradient_fitness``, which can move this one either way.
        history: one record per group visit: ``{"pass", "group", "fitness", "evaluations", "step", "seconds"}``
            (``seconds`` since the start of this run: a resumed search counts again from 0).
        evaluations: number of fitness evaluations (each over the whole calibration set).
        seconds: wall time of the refinement: reference outputs, the lossless check, the start candidates, the
            search, its guards and the gradient stage (from :func:`~cptv_plugin.refinement.run_refinement`'s start
            to its commit; the framework's analysis of the model before it is not counted).
        groups: names of the searched groups, in model order, with their number of scales.
        interrupted: the search was stopped early (Ctrl-C); the best scales found so far were kept.
        device: where the search ran (GPU name or "cpu"); precision: the arithmetic of candidate evaluations.
        ranks: how many processes shared the search (``SearchConfig.distributed``; 1: this one alone).
        compiled: share of the model's segments whose candidates ran through ``torch.compile`` (0: eager; 1: all,
            with ``compile=True`` where the framework and torch allowed it).
        resumed_from: the group visit a resumed search started from (``None``: not resumed).
        validation: with ``validation_fraction``: held-out fitness before and after, and whether the initial
            scales were restored because the refined ones were worse there.
            With ``validation_selection="per_pass"`` also ``"passes"`` (the held-out fitness of the start and after
            each pass) and ``"chosen_pass"`` (whose scales were kept; −1: the start's).
        agreement: with ``agreement_guard``: top-1 agreement with the full-precision model on the calibration
            images before and after, and whether the initial scales were restored because it fell.
        initial_agreement: top-1 agreement with the full-precision model on the calibration images before the
            search (always measured, one forward pass; below 0.5 a warning says the start is too far off).
        start: with ``start_candidates``: the fitness of the user's scales (``"given"``) and of each candidate,
            which one the search started from (``"chosen"``) and by what (``"judged_by"``: ``"fitness"``, or
            ``"agreement"`` when the given scales were far off; then ``"agreement"`` holds each one's).
        search_fitness: fitness after the search and its guards, before the gradient stage (with ``passes=0``
            the given scales'; ``None`` where the model was left as given, see ``lossless``): what the search did,
            whichever way the stage then moves ``final_fitness``.
        gradient: with ``gradient_steps``: the gradient stage's fitness before and after, whether its scales were
            kept (``"kept"``), how many quantizers it moved and its seconds (``cptv_plugin.gradient``).
        lossless: with ``lossless_kl``: the given scales' mean KL divergence from the full-precision outputs, the
            threshold, and whether the model was left untouched because the divergence was below it
            (``"skipped"``: no search, no stage; both fitnesses are then the given scales').
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
    ranks: int = 1
    precision: str = "fp32"
    compiled: float = 0.0
    resumed_from: int | None = None
    validation: dict | None = None
    agreement: dict | None = None
    initial_agreement: float | None = None
    start: dict | None = None
    gradient: dict | None = None
    lossless: dict | None = None
    search_fitness: float | None = None

    @property
    def improvement(self) -> float:
        """Relative fitness reduction, ``1 - final / initial``."""
        return 1.0 - self.final_fitness / self.initial_fitness if self.initial_fitness else 0.0

    def figures(self) -> dict:
        """The figures a script reports (JSON-friendly): the fitness at the start and the end, the search's own
        result, the gradient stage's loss and verdict, evaluations and seconds."""
        stage = self.gradient or {}
        return {"fitness": [self.initial_fitness, self.final_fitness], "search_fitness": self.search_fitness,
                "stage": {key: stage.get(key) for key in ("fitness", "loss_before", "loss_after", "kept")}
                if stage.get("loss_before") is not None else None,
                "evaluations": self.evaluations, "seconds": self.seconds}

    def __str__(self) -> str:
        """One line: the search's fitness, and the gradient stage's own (it lowers another fitness, which is why
        the search's can end higher than it started) or why the model was left as it was."""
        parts = [f"{self.config.fitness if self.config else 'fitness'} {self.initial_fitness:.5f} -> "
                 f"{self.final_fitness:.5f}"]
        if self.lossless and self.lossless.get("skipped"):
            parts.append(f"left as given: KL {self.lossless['kl']:.2g} < lossless_kl={self.lossless['threshold']:g}")
        stage = self.gradient
        if stage and stage.get("loss_before") is not None:
            parts.append(f"gradient stage {stage['fitness']} {stage['loss_before']:.4g} -> {stage['loss_after']:.4g} "
                         f"in {stage['steps']} steps ({'kept' if stage['kept'] else 'not kept'})")
        parts += [f"{self.evaluations} evaluations", f"{self.seconds:.1f} s"]
        if self.ranks > 1:
            parts.append(f"{self.ranks} ranks")
        return "RefineResult(" + ", ".join(parts + (["interrupted"] if self.interrupted else [])) + ")"


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


class CheckpointMismatchError(ValueError):
    """A search checkpoint belongs to another model, config or calibration set."""


CHECKPOINT_FORMAT = 1


def _save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (a temporary file renamed into place)."""
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


def _load_checkpoint(path: Path, fingerprint: str) -> dict | None:
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != fingerprint:
        raise CheckpointMismatchError(
            f"the search checkpoint {path} was written for another model, config or calibration set "
            f"(fingerprint {str(state.get('fingerprint'))[:12]}…, this run {fingerprint[:12]}…). Delete it to start "
            "over, or pass another checkpoint_path.")
    return state


def evolutionary_search(groups: list[Group], evaluator: Evaluator, config: SearchConfig,
                        fingerprint: str = "", starts: dict[str, list[torch.Tensor]] | None = None,
                        given_agreement: float | None = None,
                        pass_judge: Callable[[], float] | None = None) -> RefineResult:
    """Run K passes of the block-wise search over ``groups`` (in model order); scales are left at the best
    found. The current scales are always a member of the population, so the fitness never increases.

    ``starts`` (name -> one vector per group, e.g. from :func:`cptv_plugin.starts.start_vectors`) are judged
    before the first visit against the current scales; the search starts from the winner (:func:`_choose_start`:
    the fittest, or the one agreeing most with the full-precision top-1 when the current scales are far off;
    ``given_agreement``: that agreement of the current scales where the caller measured it already).

    ``pass_judge`` (e.g. the fitness on held-out images; lower is better) scores the scales before the first visit
    and after every pass; the search ends at the scales it scored best (``RefineResult.validation["passes"]``).

    With ``config.checkpoint_path`` the state (scales of every group, RNG states, position, history) is saved
    atomically after every group visit; a run started again with the same model, config and calibration set
    (``fingerprint``) resumes there and ends with exactly the scales of an uninterrupted run. With several ranks
    (``evaluator.shard``) rank 0 writes the checkpoint and shows progress, and every rank resumes from what rank 0
    reads.
    """
    start_time = time.time()
    shard: Shard = getattr(evaluator, "shard", None) or Shard()
    generator = torch.Generator().manual_seed(config.seed)
    rng = random.Random(config.seed)
    weight_bits = min((h.bits for g in groups for h in g.handles if h.role == "weight"), default=8)
    gamma = config.mutation_for_bits(weight_bits)
    # the units each visit moves (the groups themselves, or finer / coarser ones: config.granularity)
    units, visits = visit_plan(groups, config.passes, config.granularity, reverse=config.block_order == "reverse")
    initial_vectors = [g.read() for g in groups]
    gammas = [gamma] * len(units)  # per unit; moved only by config.step_adaptation
    cma_states: list[SepCMA | None] = [None] * len(units)  # per unit, with a CMA strategy
    # with pass_judge: {"passes": [the start's score, then one per pass], "best": {score, fitness, pass, vectors}}
    judged: dict = {}
    checkpoint_path = Path(config.checkpoint_path) if config.checkpoint_path else None
    saved = shard.from_leader(lambda: _load_checkpoint(checkpoint_path, fingerprint)) if checkpoint_path else None
    if saved is not None:
        set_groups(groups, saved["vectors"])
        evaluator.invalidate()
        evaluator.evaluations = saved["evaluations"]
        generator.set_state(saved["torch_rng"])
        rng.setstate(_as_random_state(saved["py_rng"]))
        best_fitness = saved["best_fitness"]
        initial_fitness = saved["initial_fitness"]
        gammas = list(saved.get("gammas", gammas))
        judged = saved.get("judged", {})
        for index, state in enumerate(saved.get("cma", [])):
            if state is not None:
                cma_states[index] = SepCMA(state["mean"], state["sigma"], _cma_population(config))
                cma_states[index].load_state_dict(state)
        resume_at = saved["next_visit"]
        logger.info("resuming the search from %s at visit %d (fitness %.5f)", checkpoint_path, resume_at,
                    best_fitness)
    else:
        best_fitness = initial_fitness = evaluator(None)
        resume_at = 0
    result = RefineResult(initial_fitness=initial_fitness, final_fitness=best_fitness, config=config,
                          groups={g.name: len(g) for g in groups})
    if saved is None and starts:
        best_fitness, result.start = _choose_start(groups, evaluator, starts, initial_vectors, initial_fitness,
                                                   given_agreement)
    if saved is not None:
        result.history = list(saved["history"])
        result.resumed_from = resume_at
    elif pass_judge is not None:  # the scales the search starts from (the given ones, or the chosen start)
        score = pass_judge()
        judged = {"passes": [score], "best": {"score": score, "fitness": best_fitness, "pass": -1,
                                              "vectors": [g.read().cpu() for g in groups]}}
    logger.info("searching %d groups (%d scales), %d passes, gamma=%g (%s), initial fitness %.5f",
                len(groups), sum(result.groups.values()), config.passes, gamma, config.mutation_kind, best_fitness)
    try:
        from tqdm.auto import tqdm
        progress = tqdm(total=len(visits), initial=resume_at, desc="cpt-v search",
                        disable=not config.progress or not shard.leader, unit="group")
    except ImportError:  # pragma: no cover - tqdm is a dependency
        progress = None
    try:
        for visit, (pass_index, unit_index) in enumerate(visits):
            if visit < resume_at:
                continue
            group = units[unit_index]
            population: list[tuple[torch.Tensor, float]] = []
            step = gammas[unit_index]
            fitness_at_start = best_fitness
            tried: list[float] = []  # fitness of every candidate of this visit, for the step adaptation
            try:
                current = group.read()
                population.append((current, best_fitness))
                # the fast engine re-runs the suffix from the cached group input; the literal one everything
                segment = group.segment if config.engine == "fast" else None
                if segment is not None:
                    evaluator.advance(segment)
                # first pass: data-free seeds (e.g. MSE-clipped weights) take the place of mutated members
                seeds = seed_vectors(group, config.seed_candidates) if pass_index == 0 else []
                seeds = [seed.to(current.device, current.dtype) for seed in seeds]
                if config.strategy in ("cma", "cma_elitist"):
                    if cma_states[unit_index] is None:
                        cma_states[unit_index] = SepCMA(current.double().clamp_min(MIN_SCALE).log(),
                                                        gamma / math.sqrt(3), _cma_population(config))
                    elif config.strategy == "cma_elitist":  # sample around the best scales found, not the mean
                        cma_states[unit_index].mean = current.double().cpu().clamp_min(MIN_SCALE).log()
                    population.extend(_cma_generation(cma_states[unit_index], group, population[0], seeds,
                                                      evaluator, segment, generator))
                    tried.extend(f for _, f in population[1:])
                    step = cma_states[unit_index].sigma
                else:  # the paper's tournament
                    members = seeds[:config.population - 1]
                    members += [mutate(current, step, config.mutation_kind, generator)
                                for _ in range(config.population - 1 - len(members))]
                    fitnesses = _evaluate_all(group, members, evaluator, segment)
                    population.extend(zip(members, fitnesses))
                    tried.extend(fitnesses)
                    for _ in range(config.cycles):
                        drawn = rng.sample(range(len(population)), min(config.samples, len(population)))
                        parent = min(drawn, key=lambda i: population[i][1])
                        child = mutate(population[parent][0], step, config.mutation_kind, generator)
                        group.set(child)
                        population.append((child, evaluator(segment)))
                        tried.append(population[-1][1])
                        worst = max(range(len(population)), key=lambda i: population[i][1])
                        population.pop(worst)
            finally:
                # whatever happened, leave the group at the best member evaluated so far
                if population:
                    best_vector, best_fitness = min(population, key=lambda member: member[1])
                    group.set(best_vector)
                    if config.step_adaptation == "one_fifth":
                        gammas[unit_index] = adapt_step(step, gamma, tried, fitness_at_start)
            result.history.append({"pass": pass_index, "group": group.name, "fitness": best_fitness,
                                   "evaluations": evaluator.evaluations, "step": step,
                                   "seconds": round(time.time() - start_time, 3)})
            if pass_judge is not None and (visit + 1 == len(visits) or visits[visit + 1][0] != pass_index):
                _judge_pass(judged, pass_judge, groups, best_fitness, pass_index)
            if checkpoint_path is not None and shard.leader:
                _save_checkpoint(checkpoint_path, {
                    "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "next_visit": visit + 1,
                    "vectors": [g.read().cpu() for g in groups], "best_fitness": best_fitness,
                    "initial_fitness": initial_fitness, "history": result.history,
                    "evaluations": evaluator.evaluations, "torch_rng": generator.get_state(), "gammas": gammas,
                    "py_rng": rng.getstate(), "cma": [c.state_dict() if c else None for c in cma_states],
                    "judged": judged})
            if progress is not None:
                progress.update(1)
                progress.set_postfix(fitness=f"{best_fitness:.4f}")
    except KeyboardInterrupt:
        result.interrupted = True
        if config.on_interrupt == "restore":
            logger.warning("search interrupted: restoring the initial scales (on_interrupt='restore')")
            set_groups(groups, initial_vectors)
            best_fitness = initial_fitness
        else:
            logger.warning("search interrupted: keeping the best scales found so far")
    finally:
        if progress is not None:
            progress.close()
    if judged and not result.interrupted:
        best = judged["best"]
        if best["pass"] < config.passes - 1:  # an earlier pass (or the start) did better on the held-out images
            logger.info("keeping the scales after pass %d (held-out %.5f; the last pass: %.5f)", best["pass"],
                        best["score"], judged["passes"][-1])
            set_groups(groups, best["vectors"])
            evaluator.invalidate()
            best_fitness = best["fitness"]
        result.validation = {"passes": list(judged["passes"]), "chosen_pass": best["pass"]}
    result.final_fitness = best_fitness
    result.evaluations = evaluator.evaluations
    if checkpoint_path is not None and shard.leader and not result.interrupted and checkpoint_path.exists():
        checkpoint_path.unlink()  # finished: the model now holds the result
    result.seconds = time.time() - start_time
    logger.info("search done: fitness %.5f -> %.5f in %.1f s (%d evaluations)", result.initial_fitness,
                result.final_fitness, result.seconds, result.evaluations)
    return result


# below this top-1 agreement with the full-precision model on the calibration images, a start is far off
POOR_START_AGREEMENT = 0.5


def _choose_start(groups: list[Group], evaluator: Evaluator, starts: dict[str, list[torch.Tensor]],
                  given: list[torch.Tensor], given_fitness: float,
                  given_agreement: float | None = None) -> tuple[float, dict]:
    """Leave ``groups`` at the best of the ``given`` scales and each start; returns its fitness and a record of
    the comparison (``{"given": f, name: f, ..., "chosen": name, "judged_by": ...}``).

    The fittest wins, unless the given scales agree with the full-precision model's top-1 on fewer than half of
    the images: then the start that agrees most often wins (ties: the fitter). A model whose outputs collapsed to a
    constant scores InfoNCE = ln(batch) exactly, better than an informative model that is still poorly aligned
    (DeiT-like e2e W4A4, benchmarks/FINDINGS.md, section 13), so the fitness alone keeps such a start.
    """
    agreement = getattr(evaluator, "agreement", None)
    if given_agreement is None and agreement is not None:
        given_agreement = agreement()
    by_agreement = given_agreement is not None and given_agreement < POOR_START_AGREEMENT
    record = {"given": given_fitness}
    scores = {"given": (-given_agreement, given_fitness) if by_agreement else (given_fitness,)}
    agreements = {"given": given_agreement}
    for name, vectors in starts.items():
        set_groups(groups, vectors)
        evaluator.invalidate()
        record[name] = fitness = evaluator(None)
        if by_agreement:
            agreements[name] = agreement()
            scores[name] = (-agreements[name], fitness)
        else:
            scores[name] = (fitness,)
    best_name = min(scores, key=lambda name: scores[name])  # the given scales first: a tie keeps them
    chosen = given if best_name == "given" else starts[best_name]
    set_groups(groups, chosen)
    evaluator.invalidate()
    record.update(chosen=best_name, judged_by="agreement" if by_agreement else "fitness")
    if by_agreement:
        record["agreement"] = agreements
    logger.info("starting from %s (fitness %.5f; the given scales: %.5f; judged by %s)", best_name,
                record[best_name], given_fitness, record["judged_by"])
    return record[best_name], record


def _evaluate_all(group: Group, vectors: list[torch.Tensor], evaluator: Evaluator,
                  segment: int | None) -> list[float]:
    """Fitness of ``group`` at each of ``vectors``: the evaluations are queued back to back and read with one
    device sync, so the device does not wait for the host between them (they do not depend on each other).
    An evaluator without ``queue`` (any callable giving a float) is called once per vector."""
    queue = getattr(evaluator, "queue", None)
    values = []
    for vector in vectors:
        group.set(vector)
        values.append(queue(segment) if queue is not None else evaluator(segment))
    return evaluator.collect(values) if queue is not None else values


def _judge_pass(judged: dict, pass_judge: Callable[[], float], groups: list[Group], fitness: float,
                pass_index: int) -> None:
    """Score the scales at the end of pass ``pass_index`` and remember them if they beat every earlier pass."""
    score = pass_judge()
    judged["passes"].append(score)
    if score < judged["best"]["score"]:
        judged["best"] = {"score": score, "fitness": fitness, "pass": pass_index,
                          "vectors": [g.read().cpu() for g in groups]}


def _cma_population(config: SearchConfig) -> int:
    """λ of the CMA strategy: a visit evaluates λ candidates and the new mean, the tournament's P − 1 + C."""
    return max(2, config.population - 2 + config.cycles)


def _cma_generation(state: SepCMA, group: Group, current: tuple[torch.Tensor, float], seeds: list[torch.Tensor],
                    evaluator: Evaluator, segment: int | None,
                    generator: torch.Generator) -> list[tuple[torch.Tensor, float]]:
    """One sep-CMA-ES generation on ``group`` from its ``current`` (scales, fitness): the seeds first, and the mean
    moved to the best of them if it beats the current scales (so the generation samples around it), then ``λ``
    sampled candidates (queued together), the state told their ranking, then the moved mean evaluated. Returns
    every evaluated member."""
    members: list[tuple[torch.Tensor, float]] = []
    if seeds:
        members = list(zip(seeds, _evaluate_all(group, seeds, evaluator, segment)))
        best_seed, best_fitness = min(members, key=lambda member: member[1])
        if best_fitness < current[1]:
            state.mean = best_seed.double().cpu().clamp_min(MIN_SCALE).log()
    samples = state.ask(max(0, state.population - len(seeds)), generator)
    device, dtype = current[0].device, current[0].dtype
    vectors = [sample.exp().to(device, dtype).clamp_min(MIN_SCALE) for sample in samples]
    fitnesses = _evaluate_all(group, vectors, evaluator, segment)
    if samples:
        state.tell(samples, fitnesses)
    mean = state.mean.exp().to(device, dtype).clamp_min(MIN_SCALE)
    group.set(mean)
    return members + list(zip(vectors, fitnesses)) + [(mean, evaluator(segment))]


def adapt_step(step: float, initial: float, fitnesses: list[float], reference: float) -> float:
    """Rechenberg's 1/5th success rule per group visit: the step grows when more than a fifth of the visit's
    candidates (``fitnesses``) beat the scales it started from (``reference``), shrinks otherwise; kept within
    [γ/100, 20·γ]."""
    if not fitnesses:
        return step
    successes = sum(1 for f in fitnesses if f < reference)
    moved = step * math.exp((successes - 0.2 * len(fitnesses)) / 4.0)
    return min(max(moved, initial / 100.0), initial * 20.0)


def _as_random_state(state):
    """``random.setstate`` wants tuples; a checkpoint may give lists back."""
    return tuple(_as_random_state(x) for x in state) if isinstance(state, (list, tuple)) else state
