"""Search settings: one dataclass with named presets (``SearchConfig()``, ``SearchConfig.paper()``, ...)."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union

__all__ = ["SearchConfig", "SearchConfigLike"]

MutationKind = Literal["absolute", "relative"]


@dataclass
class SearchConfig:
    """Settings of the block-wise evolutionary search (CPT-V, the paper's Algorithm 1).

    Args:
        passes: K, passes over all groups of scales. 0: no evolutionary search; the start candidates, when any, are
            still judged and the gradient stage still runs (a gradient-only refinement).
        population: P, population size per group visit (the current scales are one member).
        cycles: C, evolution cycles per group visit.
        samples: S, members drawn per tournament; the fittest is the parent.
        mutation: γ, the half-width of the uniform mutation. ``None`` picks it from the weight bit width
            (``mutation_8bit`` for 8-bit weights, ``mutation_low_bit`` below), as the paper does.
        mutation_kind: ``"absolute"`` adds U(−γ, γ) to every scale (the paper); ``"relative"`` multiplies each
            scale by exp(U(−γ, γ)), a move of the same relative size for large and small scales.
        fitness: name of a registered fitness (``"infonce"``, ``"mse"``, ``"cosine"``, ``"kl"``, ``"hessian"``).
        temperature: InfoNCE temperature τ.
        feature_weight: add to the search's fitness this multiple of an InfoNCE between the quantized and the
            full-precision *features before the head* (the values that enter the model's last segment: the last
            block's output tokens), so that a candidate must also keep the representation, not only the logits.
            The full-precision features come from the model with its quantizers off. 0 (default): logits only.
            Needs a model the engine can cut between blocks; the gradient stage keeps ``gradient_fitness``. Measured
            with 1 on the search alone it does not pay (+0.29 points over 36 paired runs on the reference models
            against a control on the same GPU, 20 gains and 16 losses: the size the same search moves by on another
            GPU; benchmarks/FINDINGS.md, sections 28 and 32).
        normalize: L2-normalize outputs before the InfoNCE dot products.
        batch_size: calibration images per fitness batch (for InfoNCE, the other images are the negatives).
        block_order: ``"forward"`` (first block first) or ``"reverse"`` (last first, as the authors' code).
        search_outside_blocks: also search the scales before the first block (patch embedding) and after the
            last (final norm, head) as two extra groups.
        roles: which scales move: ``("weight",)`` or ``("weight", "activation")``.
        seed: seeds every random choice; same seed, data and config give the same scales on the CPU. On a GPU
            the kernels' reduction order varies from run to run, and the search can amplify it into other choices.
        device: where the search runs (``None``: where the model's parameters are).
        progress: show a progress bar.
        engine: ``"fast"`` (default: block inputs cached once per group visit, candidates re-run only the
            blocks from the searched one on) or ``"literal"`` (a full forward per candidate, as the paper; for
            comparisons). Both give the same scales in fp32.
        precision: arithmetic of candidate evaluations: ``"fp32"``, ``"tf32"`` (CUDA matmuls in TF32), ``"bf16"``
            or ``"fp16"`` (autocast), or ``"auto"`` (default): fp32 on the CPU, bf16 autocast on CUDA. The
            full-precision reference outputs are always computed in fp32.
        compute_batch_size: images per forward pass; fitness batches (``batch_size``) are grouped into passes of
            up to this many images and split again for the fitness. ``None``: ``batch_size`` on the CPU, 1,000
            on CUDA.
        compile: compile the evaluation segments with ``torch.compile`` (costs compile time up front), and the
            gradient stage where it is not replayed as a CUDA graph (``gradient_cuda_graph``). ``"auto"``
            (default): on for CUDA, off on the CPU.
        checkpoint_path: save the search state there after every group visit (atomically); a run started
            again with the same model, config and calibration images resumes where it stopped and ends with
            exactly the scales of an uninterrupted run. The file is removed when the search finishes.
        on_interrupt: what Ctrl-C leaves in the model: ``"keep_best"`` (the best scales found so far) or
            ``"restore"`` (the scales it was given).
        seed_candidates: data-free scale vectors put into each group's first population in place of mutated
            members (``"weight_mse"``: every weight's per-channel scale clipped to minimize its own quantization
            error; see :mod:`cptv_plugin.starts`). Judged by the same fitness, so adopted only where they beat the
            user's calibration; the number of evaluations does not change. Default ``("weight_mse",)`` (measured
            on the reference models: +9 to +27 points at linear W2A8, +1.5 at W3A8 on the LeViT-like model, noise
            elsewhere; benchmarks/FINDINGS.md, section 10); the ``paper`` and ``fast`` presets use none.
        start_candidates: whole-model alternatives to the user's scales, judged once before the first visit; the
            search starts from the fittest of them and the user's (from the one agreeing most often with the
            full-precision model's top-1 when the user's agree on fewer than half of the images;
            ``RefineResult.start`` says which and why). ``"activation_mse"``: every per-tensor activation range
            clipped to minimize the quantization error of the full-precision activations on up to 256 calibration
            images (one extra forward pass and one evaluation; see :mod:`cptv_plugin.starts`). Default
            ``("activation_mse",)`` for ``default`` and ``fast`` (measured on the reference models: +2 to +74
            points at 4-bit activations, noise at 8 bits; benchmarks/FINDINGS.md, section 13); ``paper``: none.
        step_adaptation: ``"none"`` (a fixed γ, the paper) or ``"one_fifth"``: each group's γ grows when more than
            a fifth of a visit's candidates beat its starting scales and shrinks otherwise (Rechenberg's rule).
            In the default's search it gained +1.68 points over 36 paired runs on the reference models, but with the
            gradient stage after it only the LeViT-like model's e2e W4A4 row gained (−0.32 at the three others
            measured), so it is off by default (benchmarks/FINDINGS.md, section 33).
        strategy: how a group visit searches: ``"tournament"`` (the paper's Algorithm 1: P mutated members, then C
            cycles of tournament selection and mutation) or ``"cma"``: one generation of separable CMA-ES per visit
            in log-scale space (λ = P − 2 + C candidates and the recombined mean, the tournament's evaluations), its
            step size (starting at γ/√3, the spread of the relative mutation) and diagonal covariance carried from
            pass to pass (:mod:`cptv_plugin.cma`). ``"cma_elitist"``: the same, but each visit re-centres the
            distribution on the group's best scales found so far (the scales the search holds) instead of keeping
            CMA's recombined mean. Both need ``mutation_kind="relative"`` and no ``step_adaptation``. Measured on the
            search alone neither pays: −7.8 and −10.4 points at the LeViT-like model's linear W2A8, −0.28 and −0.88
            over all 36 paired runs against a control on the same GPU (benchmarks/FINDINGS.md, sections 29 and 32).
        granularity: which scales move together. ``"block"`` (the paper): each group. ``"fine_to_coarse"``
            (PFCR's schedule applied to the search): the first 30 % of the passes move each block's sub-units
            (attention, MLP) on their own, the last 30 % pairs of consecutive groups, the rest whole groups.
            Sub-unit passes make twice the visits and pair passes half. Measured on the reference models it does
            not pay: −0.19 points on the search alone over 36 paired runs, −0.11 inside the default preset at
            the e2e 4-bit-activation rows, for 7-50 % more evaluations (benchmarks/FINDINGS.md, section 25).
        validation_fraction: hold out this share of the calibration images (drawn by ``seed``); the search
            never sees them, and if the refined scales are worse than the initial ones on them, the initial
            scales are restored (``RefineResult.validation`` says so). 0 disables the guard.
        validation_selection: with ``validation_fraction``: ``"end"`` (default) compares only the initial and the
            refined scales on the held-out images; ``"per_pass"`` measures them after every pass and keeps the
            scales of the pass (or the initial ones) that scored best there: the held-out images decide between
            the passes' results, an early stop. One held-out evaluation per pass. Measured with ``fast`` on the CI
            ViT it kept the last pass in 8 of 12 runs, +0.00 points against ``"end"``; with the default's 10 passes
            on the reference models −0.07 over 36 runs (benchmarks/FINDINGS.md, sections 30-31).
        agreement_guard: measure, on the calibration images, how often the quantized model's top-1 agrees with
            the full-precision model's, before and after the search; restore the initial scales if the search
            lowered it (``RefineResult.agreement`` says so). Label-free, two extra forward passes. It catches
            what a lower fitness can hide: a collapsed model whose InfoNCE falls towards ln(batch) as its
            outputs become constant (benchmarks/FINDINGS.md, section 8). Off by default: with the default's
            activation start the search raised the agreement in every e2e W2A8/W4A4 run on the reference models
            and the guard never fired (section 33).
        gradient_steps: after the search, this many Adam steps move every scale at once on ``gradient_fitness``
            (rounding passes gradients straight through; one calibration batch per step; fp32 whatever
            ``precision`` says; on CUDA replayed as a CUDA graph, see ``gradient_cuda_graph``; see
            :mod:`cptv_plugin.gradient`). The mean
            ``gradient_fitness`` over the calibration set is checked ``gradient_checks`` times; the best scales are
            kept if they beat the search's (``RefineResult.gradient`` says so). 0 disables the stage. Default 1,000
            (measured on the reference models: benchmarks/FINDINGS.md, sections 14-15); ``paper``: 0.
        gradient_lr: Adam's learning rate on ``log(scale)`` (a relative step), cosine-decayed to 0; divided by
            ``gradient_backtrack`` whenever a check finds the fitness above the search's.
        gradient_checks: how many times the stage measures the calibration fitness (evenly spaced, the last at
            its end; each costs one forward pass over the calibration set). 1: only at the end, the last step's
            scales or none (the stage of session 10).
        gradient_warmup: the fraction of ``gradient_steps`` over which the rate rises linearly from 0 to
            ``gradient_lr`` before its cosine decay (Adam's first steps move every scale by about the full rate). 0
            (default): no warm-up; 0.1 measured on the Swin- and LeViT-like W2A8 rows at 3 seeds did not make the
            first checks overshoot less often, nor top-1 better beyond the runs' spread (benchmarks/FINDINGS.md,
            section 19).
        gradient_backtrack: when a check finds the stage's fitness above the search's (the rate overshot), the
            best scales so far are put back and the rate is divided by this for the rest of the stage. Default 10;
            3 keeps a stage cut twice at 1.1e-3 instead of 1e-4 (where it stalls), but measured on the Swin-like
            e2e W2A8 row (12 paired seeds, with the weights clipped before the stage: section 39) it gained +0.14,
            inside the noise (benchmarks/FINDINGS.md, section 38).
        gradient_grace: checks before this many steps never cut the rate (they still keep the best scales).
            Adam's first steps raise the fitness for a few dozen steps before it falls; a check there cuts the rate
            for good (checks every 20 steps measured −1.35 points at the Swin-like e2e W2A8 row, section 38). 110
            (default since session 39; the default's checks come every 100 steps, so the first that may cut is the
            step-200 one): at the 34 matrix runs whose stage was cut at step 100 it gained +1.96 points on average
            against a same-call control (10 runs beyond +2, all LeViT-like at 4-bit activations, up to +12.6;
            none below −1), and a run whose step-100 check is below its start takes the same steps (section 47).
            ``fast`` takes 100 (its checks every 30 steps; sections 42-44). 0: every check may cut (the default
            before session 39; a stage of at most 110 steps is never cut with the grace, only kept at its best
            check, so give it 0 where a short stage should back off). With the weights clipped before the stage,
            100 measured −0.02 at the Swin-like e2e W2A8 row (section 39).
        gradient_clip_weights: when to clip the weights that the commit clips (torch.ao FX weights narrower than
            int8, ``refine_fx(clamp_weights=True)``) onto their grid during the stage. The fake-quantized model does
            not change, but the stage then learns scales for the weights that will be converted: a weight beyond
            the grid no longer pulls its scale outwards through the straight-through gradient, nor comes back when
            the scale grows. ``"never"`` (default): only the commit clips. ``"before"``: at the searched scales,
            before the first step; with ``fast`` at the Swin-like e2e W2A8 row it steadied the stage (12 seeds:
            86.10 ± 4.16 without, the stage cut in 5 runs; 89.04 ± 0.33 with, cut in none of 48 stages), but it
            lost where the stage never overshoots: the default −0.54 / −0.83 at the DeiT- / LeViT-like W2A8 rows,
            ``fast`` −1.56 on the CI ViT (3 seeds, each lower; benchmarks/FINDINGS.md, section 39).
            ``"on_overshoot"``: at the first check above the search's fitness that finds a weight to clip, at the
            best scales so far, instead of cutting the rate: a stage that never overshoots, or has no weight beyond
            its grid (8-bit weights), runs as with ``"never"``. With ``fast`` at the Swin-like e2e W2A8 row: 86.55 ±
            4.35 → 88.27 ± 2.01 (12 paired seeds; it never fired at the DeiT- and LeViT-like W2A8 rows; section 40;
            with ``fast``'s grace it never fired at the CI ViT's e2e W2A8 row, section 49). Frameworks whose
            quantizers keep float weights (ModelOpt, pytorch-quantization, PT2E) have nothing to clip.
        gradient_batch_size: images per gradient step: whole calibration batches (``batch_size``) packed into one
            forward pass of up to this many images; the step lowers the mean of their fitness (each batch keeps
            its own negatives). ``None`` (default): one calibration batch per step.
        gradient_cuda_graph: on CUDA, capture the gradient stage's step (forward, backward, Adam update of the
            eager model) as a CUDA graph and replay it, instead of compiling it (``compile``) or launching each
            kernel from Python: nothing to compile, the eager step's arithmetic. Default ``True``: on a machine
            that has not compiled the model before, the default preset on the Swin-like reference model with every
            op quantized took 72 s instead of 355 s on an H100, at the same accuracy (benchmarks/FINDINGS.md,
            section 18); ``False`` compiles the stage, whose steps then run faster (DeiT-like, every op quantized:
            ~45 instead of 81 ms) once inductor's cache holds the model: for refining the same model again and
            again on one machine. Falls back (with a warning) to what ``compile`` says when the model's forward
            cannot be captured. Ignored on the CPU.
        gradient_fitness: the registered fitness the gradient stage lowers (``"kl"``: KL divergence of the
            logits' softmax; any registered fitness is differentiable).
        lossless_kl: measure first the mean KL divergence between the full-precision and the quantized model's
            output softmax on the calibration images (one forward pass, fp32); below this value the given
            scales already match the full-precision model and are returned untouched (``RefineResult.lossless``
            says so), since refining them then fits the calibration images and not the task (on the reference
            models the default's refinement of such rows, KL 2e-4 to 8e-4, ended −0.13 to +0.02 points from
            the given scales' test top-1; benchmarks/FINDINGS.md, section 16). Default 1e-3; ``paper`` and
            ``fast``: 0 (always refine).
        distributed: share the search's evaluations among the ranks of torch.distributed's default process group
            (launched with ``torchrun``; every rank calls ``refine_*`` with the same model, images and config, each on
            its own device). Each rank evaluates every candidate on its share of the calibration batches, the
            fitness is summed over the ranks, and every rank makes the same choices and commits the same scales as
            one process would; the gradient stage runs whole on every rank. ``None`` (default): when a process group
            with several ranks is initialized; ``False``: this process refines alone (e.g. each rank its own model);
            ``True``: require a process group.
    """

    passes: int = 10
    population: int = 15
    cycles: int = 3
    samples: int = 10
    mutation: float | None = 0.05
    mutation_kind: MutationKind = "relative"
    mutation_8bit: float = 1e-3
    mutation_low_bit: float = 1e-4
    fitness: str = "infonce"
    temperature: float = 0.1
    feature_weight: float = 0.0
    normalize: bool = True
    batch_size: int = 100
    block_order: Literal["forward", "reverse"] = "forward"
    search_outside_blocks: bool = True
    roles: tuple[str, ...] = ("weight", "activation")
    seed: int = 0
    device: str | None = None
    progress: bool = True
    engine: Literal["fast", "literal"] = "fast"
    precision: Literal["auto", "fp32", "tf32", "bf16", "fp16"] = "auto"
    compute_batch_size: int | None = None
    compile: bool | Literal["auto"] = "auto"
    checkpoint_path: str | None = None
    on_interrupt: Literal["keep_best", "restore"] = "keep_best"
    validation_fraction: float = 0.0
    validation_selection: Literal["end", "per_pass"] = "end"
    seed_candidates: tuple[str, ...] = ("weight_mse",)
    start_candidates: tuple[str, ...] = ("activation_mse",)
    step_adaptation: Literal["none", "one_fifth"] = "none"
    strategy: Literal["tournament", "cma", "cma_elitist"] = "tournament"
    granularity: Literal["block", "fine_to_coarse"] = "block"
    agreement_guard: bool = False
    gradient_steps: int = 1000
    gradient_lr: float = 0.01
    gradient_fitness: str = "kl"
    gradient_checks: int = 10
    gradient_warmup: float = 0.0
    gradient_backtrack: float = 10.0
    gradient_grace: int = 110
    gradient_clip_weights: Literal["never", "before", "on_overshoot"] = "never"
    gradient_batch_size: int | None = None
    gradient_cuda_graph: bool = True
    lossless_kl: float = 1e-3
    distributed: bool | None = None
    name: str = field(default="default", compare=False)

    def __post_init__(self) -> None:
        for attr in ("roles", "seed_candidates", "start_candidates"):  # a list (JSON, YAML) means the same tuple
            if isinstance(getattr(self, attr), list):
                setattr(self, attr, tuple(getattr(self, attr)))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming every impossible setting."""
        problems = []
        if self.passes < 0:
            problems.append(f"passes must be >= 0 (got {self.passes}); 0 skips the evolutionary search")
        for attr in ("population", "samples", "batch_size"):
            if getattr(self, attr) < 1:
                problems.append(f"{attr} must be >= 1 (got {getattr(self, attr)})")
        if self.cycles < 0:
            problems.append(f"cycles must be >= 0 (got {self.cycles})")
        if self.samples > self.population:
            problems.append(f"samples (S={self.samples}) cannot exceed population (P={self.population})")
        for attr in ("mutation", "mutation_8bit", "mutation_low_bit"):
            value = getattr(self, attr)
            if value is not None and not value >= 0:
                problems.append(f"{attr} must be >= 0 (got {value})")
        if self.mutation_kind not in ("absolute", "relative"):
            problems.append(f"mutation_kind must be 'absolute' or 'relative' (got {self.mutation_kind!r})")
        if self.block_order not in ("forward", "reverse"):
            problems.append(f"block_order must be 'forward' or 'reverse' (got {self.block_order!r})")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0 (got {self.temperature})")
        if not self.feature_weight >= 0:
            problems.append(f"feature_weight must be >= 0 (got {self.feature_weight}); 0 scores the logits only")
        if self.engine not in ("fast", "literal"):
            problems.append(f"engine must be 'fast' or 'literal' (got {self.engine!r})")
        if self.compile not in (True, False, "auto"):
            problems.append(f"compile must be True, False or 'auto' (got {self.compile!r})")
        if self.precision not in ("auto", "fp32", "tf32", "bf16", "fp16"):
            problems.append(f"precision must be one of auto, fp32, tf32, bf16, fp16 (got {self.precision!r})")
        if self.compute_batch_size is not None and self.compute_batch_size < 1:
            problems.append(f"compute_batch_size must be >= 1 or None (got {self.compute_batch_size})")
        if self.on_interrupt not in ("keep_best", "restore"):
            problems.append(f"on_interrupt must be 'keep_best' or 'restore' (got {self.on_interrupt!r})")
        if not 0.0 <= self.validation_fraction < 1.0:
            problems.append(f"validation_fraction must be in [0, 1) (got {self.validation_fraction})")
        if self.validation_selection not in ("end", "per_pass"):
            problems.append(f"validation_selection must be 'end' or 'per_pass' (got {self.validation_selection!r})")
        elif self.validation_selection == "per_pass" and not self.validation_fraction:
            problems.append("validation_selection='per_pass' needs held-out images: set validation_fraction (e.g. 0.2)")
        if self.granularity not in ("block", "fine_to_coarse"):
            problems.append(f"granularity must be 'block' or 'fine_to_coarse' (got {self.granularity!r})")
        if self.strategy not in ("tournament", "cma", "cma_elitist"):
            problems.append(f"strategy must be 'tournament', 'cma' or 'cma_elitist' (got {self.strategy!r})")
        elif self.strategy != "tournament" and (self.mutation_kind != "relative" or self.step_adaptation != "none"):
            problems.append(f"strategy={self.strategy!r} searches log-scales with its own step size: it needs "
                            "mutation_kind='relative' and step_adaptation='none' (got "
                            f"{self.mutation_kind!r}, {self.step_adaptation!r})")
        if self.step_adaptation not in ("none", "one_fifth"):
            problems.append(f"step_adaptation must be 'none' or 'one_fifth' (got {self.step_adaptation!r})")
        if self.gradient_steps < 0:
            problems.append(f"gradient_steps must be >= 0 (got {self.gradient_steps})")
        if not self.gradient_lr > 0:
            problems.append(f"gradient_lr must be > 0 (got {self.gradient_lr})")
        if self.distributed not in (None, True, False):
            problems.append(f"distributed must be None, True or False (got {self.distributed!r})")
        if not self.lossless_kl >= 0:
            problems.append(f"lossless_kl must be >= 0 (got {self.lossless_kl}); 0 always refines")
        if self.gradient_batch_size is not None and self.gradient_batch_size < self.batch_size:
            problems.append(f"gradient_batch_size must be None or >= batch_size={self.batch_size}, a step packs "
                            f"whole calibration batches (got {self.gradient_batch_size})")
        if not 0.0 <= self.gradient_warmup <= 1.0:
            problems.append(f"gradient_warmup must be a fraction of gradient_steps in [0, 1] (got "
                            f"{self.gradient_warmup})")
        if not self.gradient_backtrack >= 1.0:
            problems.append(f"gradient_backtrack must be >= 1, the factor the rate is divided by after an "
                            f"overshoot (got {self.gradient_backtrack})")
        if self.gradient_grace < 0:
            problems.append(f"gradient_grace must be a number of steps >= 0 (got {self.gradient_grace})")
        if self.gradient_clip_weights not in ("never", "before", "on_overshoot"):
            problems.append(f"gradient_clip_weights must be 'never', 'before' or 'on_overshoot' (got "
                            f"{self.gradient_clip_weights!r})")
        if self.gradient_checks < 1:
            problems.append(f"gradient_checks must be >= 1 (got {self.gradient_checks})")
        from .fitness import list_fitness

        for attr in ("fitness", "gradient_fitness"):
            if getattr(self, attr) not in list_fitness():
                problems.append(f"{attr} must be a registered fitness {list_fitness()} (got {getattr(self, attr)!r})")
        from .starts import SEEDS, STARTS

        unknown = [name for name in self.seed_candidates if name not in SEEDS]
        if isinstance(self.seed_candidates, str) or unknown:
            problems.append(f"seed_candidates must be a tuple of registered seeds {sorted(SEEDS)} "
                            f"(got {self.seed_candidates!r})")
        unknown = [name for name in self.start_candidates if name not in STARTS]
        if isinstance(self.start_candidates, str) or unknown:
            problems.append(f"start_candidates must be a tuple of registered starts {sorted(STARTS)} "
                            f"(got {self.start_candidates!r})")
        bad_roles = set(self.roles) - {"weight", "activation"}
        if bad_roles or not self.roles:
            problems.append(f"roles must be a non-empty subset of ('weight', 'activation') (got {self.roles})")
        if problems:
            raise ValueError("invalid SearchConfig: " + "; ".join(problems))

    def mutation_for_bits(self, weight_bits: int) -> float:
        """γ for a model whose narrowest weight quantizer has ``weight_bits`` bits."""
        if self.mutation is not None:
            return self.mutation
        return self.mutation_8bit if weight_bits >= 8 else self.mutation_low_bit

    def resolved_precision(self, device_type: str) -> str:
        """The precision ``"auto"`` means on ``device_type``: fp32 on the CPU, bf16 on CUDA."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if device_type == "cuda" else "fp32"

    def resolved_compile(self, device_type: str) -> bool:
        """Whether ``compile`` (``"auto"``: on for CUDA) compiles on ``device_type``."""
        return device_type == "cuda" if self.compile == "auto" else bool(self.compile)

    def resolved_compute_batch_size(self, device_type: str) -> int:
        if self.compute_batch_size is not None:
            return self.compute_batch_size
        return 1000 if device_type == "cuda" else self.batch_size

    def replace(self, **changes) -> "SearchConfig":
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def default(cls, **overrides) -> "SearchConfig":
        """Our default: the paper's budget with scale-relative mutation, activation scales and the groups
        outside the blocks searched too, a sharper InfoNCE temperature, MSE-clipped activation ranges offered as
        the start, MSE-clipped weight scales as one member of each group's first population, and the gradient
        stage (1,000 Adam steps on every scale at once, whose checks cut the rate only from step 110) after the
        search; a model that already matches the full-precision one (``lossless_kl``) is left as it is."""
        return cls(**overrides)

    @classmethod
    def paper(cls, **overrides) -> "SearchConfig":
        """The paper's Table 2 settings: K=10, P=15, C=3, S=10, absolute γ = 1e-3 for 8-bit weights and 1e-4
        below; InfoNCE with L2-normalized logits, τ=3 and batches of 100 (as the authors' code); blocks only,
        visited last to first. Weight and activation scales move, as the paper's text says."""
        settings = dict(passes=10, population=15, cycles=3, samples=10, mutation=None, mutation_kind="absolute",
                        mutation_8bit=1e-3, mutation_low_bit=1e-4, fitness="infonce", temperature=3.0,
                        normalize=True, batch_size=100, block_order="reverse", search_outside_blocks=False,
                        roles=("weight", "activation"), seed_candidates=(), start_candidates=(), gradient_steps=0,
                        lossless_kl=0.0, name="paper")
        settings.update(overrides)
        return cls(**settings)

    @classmethod
    def fast(cls, **overrides) -> "SearchConfig":
        """A quick preset for a first look: 3 passes, P=8, C=3, S=4 (about a sixth of the default's search), the
        default's activation start and lossless check, no seed candidates (with this small population the weight
        seed measured −2.6 points on the CPU ViT at linear W2A8), and a 300-step gradient stage (the default runs
        1,000). Measured on the three reference models at every bit width (benchmarks/FINDINGS.md, section 22) the
        stage is never worse beyond noise and gains 7-51 points at W2A8, for two to three times the seconds. With
        every op quantized at 4-bit activations (torch.ao FX's global qconfig), ``passes=6`` gained 1.3 points on
        average for 10-21 % more GPU time (section 24); elsewhere it did not help. The stage's checks cut its rate
        only from step 100 (``gradient_grace=100``; before, they still keep the best scales): Adam's first steps
        raise the fitness before it falls, and a cut there stalled the stage (Swin-like e2e W2A8, seeds 0-9 on an
        H100: 85.25 ± 4.66 → 88.70 ± 0.41; 21 of the 22 runs it changed gained, sections 42-44).
        ``fast(gradient_grace=0)`` is the old stage."""
        settings = dict(passes=3, population=8, cycles=3, samples=4, seed_candidates=(), gradient_steps=300,
                        gradient_grace=100, name="fast")
        settings.update(overrides)
        return cls(**settings)

    @classmethod
    def resolve(cls, config: "SearchConfigLike") -> "SearchConfig":
        """The ``config`` argument of every ``refine_*`` function as a validated ``SearchConfig``.

        ``None`` is our default preset; a ``SearchConfig`` is taken as it is; a string names a preset (``"fast"``);
        a mapping holds settings by field name (``{"passes": 3}``, or ``{"preset": "fast", "gradient_steps": 0}``
        for a preset with overrides), as a config read from JSON or YAML (``dataclasses.asdict`` of a config gives
        one back)."""
        if config is None:
            return cls()
        if isinstance(config, SearchConfig):
            config.validate()
            return config
        if isinstance(config, str):
            return cls.preset(config)
        if isinstance(config, Mapping):
            settings = dict(config)
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown = [key for key in settings if key not in fields and key != "preset"]
            if unknown:
                hints = [f"{key!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(
                    str(key), fields, n=1)) else repr(key) for key in unknown]
                raise TypeError(f"unknown SearchConfig setting(s) {', '.join(hints)}; the settings are "
                                f"{sorted(fields)}, and 'preset' picks the preset they change")
            if "preset" in settings:
                return cls.preset(settings.pop("preset")).replace(**settings)
            return cls(**settings)
        raise TypeError(f"config must be a SearchConfig, a preset name ('default', 'paper', 'fast'), a mapping of "
                        f"settings or None; got {type(config).__name__}")

    @classmethod
    def preset(cls, name: "str | SearchConfig", **overrides) -> "SearchConfig":
        """A preset by name: ``"default"``, ``"paper"`` or ``"fast"``; a ``SearchConfig`` is taken as it is (so that
        recipes and commands that take a preset name also take a tuned config), ``overrides`` applied to either."""
        if isinstance(name, SearchConfig):
            return name.replace(**overrides)
        presets = {"default": cls.default, "paper": cls.paper, "fast": cls.fast}
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(presets)}")
        return presets[name](**overrides)


SearchConfigLike = Union[SearchConfig, str, Mapping[str, Any], None]
"""What the ``refine_*`` functions take as ``config``: see :meth:`SearchConfig.resolve`."""
