"""The paper's Algorithm 1 on a synthetic problem whose fitness is known in closed form."""

import pytest
import torch

import cptv_plugin
from cptv_plugin import SearchConfig
from conftest import TINY_SEARCH
from cptv_plugin.handles import Group, ScaleHandle
from cptv_plugin.search import evolutionary_search, mutate


class TensorHandle(ScaleHandle):
    def __init__(self, name, values):
        self.name, self.role, self.axis = name, "weight", None
        self.quant_min, self.quant_max = -8, 7
        self.values = values.clone()
        self.committed = False

    def read(self):
        return self.values.clone()

    def set(self, scale):
        self.values.copy_(scale)

    def commit(self):
        self.committed = True


class QuadraticEvaluator:
    """Fitness = Σ_g |Δ_g − target_g|²; records every call so the algorithm's steps can be checked."""

    def __init__(self, groups, targets):
        self.groups, self.targets = groups, targets
        self.evaluations = 0
        self.calls = []
        self.advanced = []

    def advance(self, segment):
        self.advanced.append(segment)

    def invalidate(self):
        pass

    def __call__(self, segment=None):
        self.evaluations += 1
        self.calls.append(segment)
        return float(sum(((g.read() - t) ** 2).sum() for g, t in zip(self.groups, self.targets)))


def make_problem(n_groups=3, size=5):
    groups = [Group(f"block{i}", [TensorHandle(f"h{i}", torch.ones(size))], segment=i) for i in range(n_groups)]
    targets = [torch.full((size,), 1.2) for _ in range(n_groups)]
    return groups, QuadraticEvaluator(groups, targets)


def interrupt_and_resume(problem, config, tmp_path, monkeypatch, stop_after, **search_kwargs):
    """The search on a fresh ``problem()`` with a checkpoint, stopped by Ctrl-C right after its ``stop_after``-th
    save, then started again on another fresh ``problem()``: returns the saved states, the resumed run's result,
    its groups and its evaluator."""
    from cptv_plugin import search

    original, saves = search._save_checkpoint, []

    def save_then_interrupt(path, state):
        original(path, state)
        saves.append(state)
        if len(saves) == stop_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(search, "_save_checkpoint", save_then_interrupt)
    config = config.replace(checkpoint_path=str(tmp_path / "resumed.ckpt"))
    assert evolutionary_search(*problem(), config, fingerprint="toy", **search_kwargs).interrupted
    monkeypatch.setattr(search, "_save_checkpoint", original)
    groups, evaluator = problem()
    return saves, evolutionary_search(groups, evaluator, config, fingerprint="toy", **search_kwargs), groups, evaluator


def test_visits_every_group_in_order_for_k_passes_and_counts_evaluations():
    config = SearchConfig(passes=3, population=5, cycles=4, samples=3, progress=False)
    groups, evaluator = make_problem()
    result = evolutionary_search(groups, evaluator, config)
    visits = [(h["pass"], h["group"]) for h in result.history]
    assert visits == [(k, f"block{i}") for k in range(3) for i in range(3)]
    # one full evaluation, then per visit P-1 new members and C children (the current member is known)
    assert result.evaluations == 1 + 3 * 3 * (5 - 1 + 4)
    assert evaluator.calls[0] is None and set(evaluator.calls[1:]) == {0, 1, 2}


class QueuingEvaluator(QuadraticEvaluator):
    """Also queues evaluations (values stay pending until collected) and counts the reads."""

    def __init__(self, groups, targets):
        super().__init__(groups, targets)
        self.reads = []

    def queue(self, segment=None):
        return torch.tensor(self(segment), dtype=torch.float64)

    def collect(self, queued):
        self.reads.append(len(queued))
        return torch.stack(queued).tolist()


def test_the_population_of_a_visit_is_read_at_once_and_the_search_is_unchanged():
    """The P-1 new members of a visit do not depend on each other: they are queued and read with one device
    sync; the children of the cycles one at a time. Same scales as evaluating one by one."""
    config = SearchConfig(passes=2, population=5, cycles=3, samples=3, progress=False)
    groups, plain = make_problem()
    plain_result = evolutionary_search(groups, plain, config)
    queued_groups, _ = make_problem()
    queuing = QueuingEvaluator(queued_groups, [torch.full((5,), 1.2) for _ in range(3)])
    result = evolutionary_search(queued_groups, queuing, config)
    assert queuing.reads == [4] * (2 * 3)  # one read of 4 new members per visit (the children: __call__)
    assert queuing.evaluations == plain.evaluations == result.evaluations
    for a, b in zip(groups, queued_groups):
        assert torch.equal(a.read(), b.read())
    assert result.final_fitness == plain_result.final_fitness


def test_reverse_order_visits_last_block_first():
    config = SearchConfig(passes=1, population=3, cycles=1, samples=2, block_order="reverse", progress=False)
    groups, evaluator = make_problem()
    result = evolutionary_search(groups, evaluator, config)
    assert [h["group"] for h in result.history] == ["block2", "block1", "block0"]


def test_fitness_never_increases_and_improves_a_quadratic():
    config = SearchConfig(passes=10, population=10, cycles=5, samples=4, mutation=0.05, progress=False)
    groups, evaluator = make_problem()
    result = evolutionary_search(groups, evaluator, config)
    fitness = [result.initial_fitness] + [h["fitness"] for h in result.history]
    assert all(b <= a for a, b in zip(fitness, fitness[1:]))
    assert result.final_fitness < 0.5 * result.initial_fitness
    # the model is left at the best member: its fitness is the reported one
    assert evaluator() == pytest.approx(result.final_fitness)


def test_initial_scales_stay_in_the_running_when_every_mutation_is_worse():
    config = SearchConfig(passes=2, population=6, cycles=3, samples=3, progress=False)
    groups, evaluator = make_problem()
    evaluator.targets = [torch.ones(5) for _ in groups]  # the start is the optimum
    result = evolutionary_search(groups, evaluator, config)
    assert result.final_fitness == result.initial_fitness == 0.0
    assert all(torch.equal(g.read(), torch.ones(5)) for g in groups)


def test_tournament_parent_is_fittest_of_sample_and_worst_is_dropped(monkeypatch):
    """With S = P the parent is always the population's best; with C cycles the population never grows."""
    import cptv_plugin.search as search

    seen_parents = []
    real_mutate = search.mutate

    def spy(parent, gamma, kind, generator):
        seen_parents.append(parent.clone())
        return real_mutate(parent, gamma, kind, generator)

    monkeypatch.setattr(search, "mutate", spy)
    config = SearchConfig(passes=1, population=4, cycles=3, samples=4, progress=False)
    groups, evaluator = make_problem(n_groups=1)
    evolutionary_search(groups, evaluator, config)
    # first P-1 calls mutate the current scales; the C cycle parents are each the best so far
    initial = torch.ones(5)
    assert all(torch.equal(p, initial) for p in seen_parents[:3])
    target = evaluator.targets[0]
    assert len(seen_parents) == 3 + 3
    for parent in seen_parents[3:]:
        assert ((parent - target) ** 2).sum() <= ((initial - target) ** 2).sum()


def test_same_seed_same_scales_and_other_seed_differs():
    config = SearchConfig(passes=2, population=5, cycles=2, samples=3, seed=7, progress=False)
    runs = []
    for seed in (7, 7, 8):
        groups, evaluator = make_problem()
        evolutionary_search(groups, evaluator, config.replace(seed=seed))
        runs.append(torch.cat([g.read() for g in groups]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_mutation_kinds():
    generator = torch.Generator().manual_seed(0)
    parent = torch.tensor([1e-3, 1.0, 100.0])
    relative = mutate(parent, 0.1, "relative", generator)
    assert torch.all((relative / parent - 1).abs() <= 0.11)
    absolute = mutate(parent, 0.1, "absolute", generator)
    assert torch.all((absolute - parent).abs() <= 0.1 + 1e-6) and torch.all(absolute > 0)


def test_paper_preset_is_table_2():
    paper = SearchConfig.paper()
    assert (paper.passes, paper.population, paper.cycles, paper.samples) == (10, 15, 3, 10)
    assert paper.mutation_for_bits(8) == 1e-3 and paper.mutation_for_bits(4) == 1e-4
    assert paper.mutation_for_bits(3) == 1e-4 and paper.mutation_kind == "absolute"


def test_presets_by_name_or_as_a_config():
    assert SearchConfig.preset("fast", seed=3) == SearchConfig.fast(seed=3)
    tuned = SearchConfig.fast(gradient_steps=20)
    assert SearchConfig.preset(tuned) is not tuned and SearchConfig.preset(tuned) == tuned
    assert SearchConfig.preset(tuned, seed=5) == SearchConfig.fast(gradient_steps=20, seed=5)
    with pytest.raises(ValueError, match="unknown preset 'quick'; choose from"):
        SearchConfig.preset("quick")
    with pytest.raises(ValueError, match="gradient_steps"):
        SearchConfig.preset(tuned, gradient_steps=-1)


def test_a_config_given_by_preset_name_or_as_settings_read_from_json():
    import dataclasses
    import json

    assert SearchConfig.resolve(None) == SearchConfig()
    assert SearchConfig.resolve("paper") == SearchConfig.paper()
    assert SearchConfig.resolve({"preset": "fast", "gradient_steps": 0}) == SearchConfig.fast(gradient_steps=0)
    assert SearchConfig.resolve({"passes": 3}) == SearchConfig(passes=3)
    tuned = SearchConfig.fast(roles=("weight",), seed=7)
    from_json = json.loads(json.dumps(dataclasses.asdict(tuned)))  # tuples come back as lists
    assert SearchConfig.resolve(from_json) == tuned and SearchConfig.resolve(from_json).roles == ("weight",)
    with pytest.raises(TypeError, match="'pasess' \\(did you mean 'passes'\\?\\)"):
        SearchConfig.resolve({"pasess": 3})
    with pytest.raises(TypeError, match="config must be a SearchConfig, a preset name .* got int"):
        SearchConfig.resolve(3)
    with pytest.raises(ValueError, match="passes must be >= 0"):
        SearchConfig.resolve({"preset": "fast", "passes": -1})


def test_refine_takes_a_config_as_settings_and_refuses_a_wrong_one_leaving_the_model_as_given(tiny_vit, fmnist):
    from conftest import prepare_and_calibrate
    from cptv_plugin.fx.refine import FxSession

    calib = fmnist[0][:100]
    settings = {name: getattr(TINY_SEARCH, name) for name in ("passes", "population", "cycles", "samples",
                                                              "batch_size", "progress", "gradient_steps",
                                                              "lossless_kl", "start_candidates")}
    refined = []
    for config in (TINY_SEARCH, settings):
        prepared = prepare_and_calibrate(tiny_vit, calib, "W4A8")
        result = cptv_plugin.refine_fx(prepared, calib, config=config)
        refined.append([h.read() for h in FxSession(prepared).all_handles])
        assert result.config == TINY_SEARCH
    assert all(torch.equal(a, b) for a, b in zip(*refined))
    given = [h.read() for h in FxSession(prepared).all_handles]
    with pytest.raises(TypeError, match="unknown SearchConfig setting"):
        cptv_plugin.refine(prepared, calib, config={"steps": 10})
    assert all(torch.equal(a, b) for a, b in zip(given, [h.read() for h in FxSession(prepared).all_handles]))


@pytest.mark.parametrize("changes, message", [
    ({"samples": 20, "population": 15}, "samples"),
    ({"passes": -1}, "passes"),
    ({"mutation": -1.0}, "mutation"),
    ({"batch_size": 0}, "batch_size"),
    ({"roles": ("bias",)}, "roles"),
])
def test_impossible_configs_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig(**changes)


def test_fast_engine_gives_exactly_the_scales_of_the_literal_one(tiny_vit, fmnist):
    """Suffix-only evaluation from cached block inputs is the same arithmetic as a full forward per candidate:
    same seed, same fitness values, same selections, same refined scales (fp32, CPU)."""
    from conftest import prepare_and_calibrate
    from cptv_plugin.fx.refine import FxSession

    calib = fmnist[0][:100]
    config = TINY_SEARCH.replace(passes=2, block_order="reverse", precision="fp32")
    results, scales = [], []
    for engine in ("fast", "literal"):
        prepared = prepare_and_calibrate(tiny_vit, calib, "W3A8")
        results.append(cptv_plugin.refine_fx(prepared, calib, config=config.replace(engine=engine)))
        scales.append([h.read() for h in FxSession(prepared).all_handles])
    fast, literal = results
    assert [r["fitness"] for r in fast.history] == [r["fitness"] for r in literal.history]
    assert fast.final_fitness == literal.final_fitness < fast.initial_fitness
    assert all(torch.equal(a, b) for a, b in zip(*scales))


def test_forward_passes_group_fitness_batches_without_changing_the_fitness(tiny_vit, fmnist):
    from conftest import prepare_and_calibrate

    calib = fmnist[0][:200]
    values = []
    for compute in (50, 200):
        prepared = prepare_and_calibrate(tiny_vit, calib, "W4A8")
        result = cptv_plugin.refine_fx(prepared, calib, config=TINY_SEARCH.replace(compute_batch_size=compute))
        values.append(result.initial_fitness)
    assert values[0] == pytest.approx(values[1], rel=1e-5)


def test_one_fifth_rule_grows_and_shrinks_the_step_within_bounds():
    from cptv_plugin.search import adapt_step

    assert adapt_step(0.05, 0.05, [0.0] * 8 + [2.0] * 2, reference=1.0) > 0.05  # 80 % successes
    assert adapt_step(0.05, 0.05, [2.0] * 10, reference=1.0) < 0.05  # none
    assert adapt_step(0.05, 0.05, [0.0] * 2 + [2.0] * 8, reference=1.0) == pytest.approx(0.05)  # exactly 1/5
    assert adapt_step(0.05, 0.05, [0.0] * 100, reference=1.0) == pytest.approx(1.0)  # 20·γ at most
    assert adapt_step(0.05, 0.05, [2.0] * 100, reference=1.0) == pytest.approx(5e-4)  # γ/100 at least
    assert adapt_step(0.05, 0.05, [], reference=1.0) == 0.05


def test_step_adaptation_moves_each_groups_step_and_still_never_worsens():
    """Far from the optimum (every mutation wins) the step grows; at the optimum (none wins) it shrinks."""
    config = SearchConfig(passes=4, population=6, cycles=2, samples=3, mutation=0.01, progress=False,
                          step_adaptation="one_fifth")
    groups, evaluator = make_problem()
    evaluator.targets = [torch.full((5,), 3.0) for _ in groups]
    result = evolutionary_search(groups, evaluator, config)
    steps = [h["step"] for h in result.history if h["group"] == "block0"]
    assert steps[0] == 0.01 and steps[-1] > 0.01
    fitness = [result.initial_fitness] + [h["fitness"] for h in result.history]
    assert all(b <= a for a, b in zip(fitness, fitness[1:]))

    groups, evaluator = make_problem()
    evaluator.targets = [torch.ones(5) for _ in groups]
    result = evolutionary_search(groups, evaluator, config)
    assert [h["step"] for h in result.history if h["group"] == "block0"][-1] < 0.01
    plain = evolutionary_search(*make_problem(), SearchConfig(passes=2, population=6, cycles=2, samples=3,
                                                               mutation=0.01, progress=False))
    assert {h["step"] for h in plain.history} == {0.01}


def test_adapted_steps_survive_a_resume(tmp_path, monkeypatch):
    """The per-group steps are part of the checkpoint: an interrupted and resumed adaptive search ends with
    exactly the scales of an uninterrupted one."""
    def problem():
        groups, evaluator = make_problem()
        evaluator.targets = [torch.full((5,), 3.0) for _ in groups]
        return groups, evaluator

    config = SearchConfig(passes=3, population=5, cycles=2, samples=3, mutation=0.01, progress=False,
                          step_adaptation="one_fifth", checkpoint_path=str(tmp_path / "a.ckpt"))
    groups, evaluator = problem()
    evolutionary_search(groups, evaluator, config, fingerprint="toy")
    uninterrupted = [g.read() for g in groups]
    saves, resumed, groups, _ = interrupt_and_resume(problem, config, tmp_path, monkeypatch, stop_after=4)
    assert saves[-1]["gammas"] != [0.01] * 3  # steps had moved when it stopped
    assert resumed.resumed_from == 4
    for got, expected in zip([g.read() for g in groups], uninterrupted):
        assert torch.equal(got, expected)


def test_sep_cma_converges_on_a_quadratic_and_learns_each_coordinates_scale():
    """Sep-CMA-ES alone: on a separable quadratic whose coordinates differ 100-fold in curvature, the mean reaches
    the optimum, the step shrinks, and the learnt variances are larger where the curvature is smaller."""
    from cptv_plugin.cma import SepCMA

    n = 8
    curvature = torch.tensor([100.0] * 4 + [1.0] * 4, dtype=torch.float64)

    def f(x):
        return float((curvature * (x - 1.0) ** 2).sum())

    state = SepCMA(torch.zeros(n), sigma=0.3, population=12)
    generator = torch.Generator().manual_seed(0)
    start = f(state.mean)
    for _ in range(150):
        candidates = state.ask(12, generator)
        state.tell(candidates, [f(c) for c in candidates])
    assert f(state.mean) < 1e-6 * start
    assert state.sigma < 0.3
    assert state.variances[4:].mean() > 3 * state.variances[:4].mean()


def test_cma_strategy_searches_with_the_tournaments_evaluations_and_survives_a_resume(tmp_path, monkeypatch):
    config = SearchConfig(passes=4, population=6, cycles=3, samples=3, mutation=0.05, progress=False,
                          strategy="cma", seed_candidates=(), checkpoint_path=str(tmp_path / "a.ckpt"))
    groups, evaluator = make_problem()
    result = evolutionary_search(groups, evaluator, config, fingerprint="toy")
    tournament = evolutionary_search(*make_problem(), config.replace(strategy="tournament", checkpoint_path=None))
    assert result.evaluations == tournament.evaluations == 1 + 4 * 3 * (6 - 1 + 3)
    fitness = [result.initial_fitness] + [h["fitness"] for h in result.history]
    assert all(b <= a for a, b in zip(fitness, fitness[1:])) and fitness[-1] < 0.5 * fitness[0]
    steps = [h["step"] for h in result.history if h["group"] == "block0"]
    assert len(set(steps)) == len(steps)  # sigma moves every generation
    uninterrupted = [g.read() for g in groups]
    saves, resumed, groups, _ = interrupt_and_resume(make_problem, config, tmp_path, monkeypatch, stop_after=5)
    assert saves[-1]["cma"][0]["generation"] == 2  # block0 had been visited twice
    assert resumed.resumed_from == 5
    for got, expected in zip([g.read() for g in groups], uninterrupted):
        assert torch.equal(got, expected)

    with pytest.raises(ValueError, match="strategy='cma' .* mutation_kind='relative'"):
        SearchConfig(strategy="cma", mutation_kind="absolute")
    with pytest.raises(ValueError, match="strategy must be 'tournament', 'cma' or 'cma_elitist'"):
        SearchConfig(strategy="cmaes")


def test_elitist_cma_samples_around_the_best_scales_found_and_plain_cma_around_its_mean(monkeypatch):
    from cptv_plugin import search

    centres = {}
    original = search.SepCMA.ask
    for strategy in ("cma", "cma_elitist"):
        seen = centres[strategy] = []
        monkeypatch.setattr(search.SepCMA, "ask", lambda self, count, generator, seen=seen:
                            seen.append(self.mean.exp().clone()) or original(self, count, generator))
        groups, evaluator = make_problem(n_groups=1)
        config = SearchConfig(passes=3, population=6, cycles=3, samples=3, mutation=0.05, progress=False,
                              strategy=strategy, seed_candidates=())
        result = evolutionary_search(groups, evaluator, config)
        if strategy == "cma_elitist":
            # visits 2 and 3 start from the scales the previous visit kept: the best member
            bests = [h["fitness"] for h in result.history]
            for centre, best in zip(seen[1:], bests[:-1]):
                assert float(((centre.float() - 1.2) ** 2).sum()) == pytest.approx(best, rel=1e-4)
    assert not torch.allclose(centres["cma"][1], centres["cma_elitist"][1])


def test_cma_moves_its_mean_to_a_seed_that_beats_the_current_scales(monkeypatch):
    """A data-free seed better than the current scales re-centres the first generation on it."""
    from cptv_plugin import search

    groups, evaluator = make_problem(n_groups=1)
    monkeypatch.setattr(search, "seed_vectors", lambda group, names: [torch.full((5,), 1.2)])  # the optimum
    config = SearchConfig(passes=1, population=6, cycles=3, samples=3, mutation=0.01, progress=False,
                          strategy="cma", seed_candidates=("weight_mse",))
    seen = []
    original = search.SepCMA.ask
    monkeypatch.setattr(search.SepCMA, "ask", lambda self, count, generator: seen.append(self.mean.clone())
                        or original(self, count, generator))
    result = evolutionary_search(groups, evaluator, config)
    torch.testing.assert_close(seen[0].exp(), torch.full((5,), 1.2, dtype=torch.float64))
    assert result.final_fitness < 1e-9  # the seed (the optimum) was kept
    assert result.evaluations == 1 + (6 - 1 + 3)


def test_per_pass_judge_keeps_the_pass_it_scores_best_and_survives_a_resume(tmp_path, monkeypatch):
    """A judge whose optimum (1.05) lies between the start (1.0) and the fitness's optimum (1.2): the search walks
    past it, and ends at the scales of the pass the judge scored best, with that pass's fitness."""
    def judge_of(groups):
        return lambda: float(sum(((g.read() - 1.05) ** 2).sum() for g in groups))

    def problem():
        return make_problem()

    config = SearchConfig(passes=6, population=6, cycles=2, samples=3, mutation=0.02, progress=False,
                          seed_candidates=(), checkpoint_path=str(tmp_path / "a.ckpt"))
    groups, evaluator = problem()
    plain = evolutionary_search(groups, evaluator, config.replace(checkpoint_path=None))
    groups, evaluator = problem()
    judged = evolutionary_search(groups, evaluator, config, fingerprint="toy", pass_judge=judge_of(groups))
    scores, chosen = judged.validation["passes"], judged.validation["chosen_pass"]
    assert len(scores) == 7 and 0 <= chosen < 5 and scores[chosen + 1] == min(scores)
    assert scores[-1] > min(scores)  # the last pass had walked past the judge's optimum
    end_of_pass = [h["fitness"] for h in judged.history if h["group"] == "block2"]
    assert judged.final_fitness == end_of_pass[chosen] > plain.final_fitness
    assert judge_of(groups)() == pytest.approx(min(scores))
    kept = [g.read() for g in groups]

    # resumed after an interruption in pass 3, the same scales are kept (the best pass so far is in the checkpoint)
    made = []

    def remembered():
        made.append(problem())
        return made[-1]

    saves, resumed, groups, _ = interrupt_and_resume(remembered, config, tmp_path, monkeypatch, stop_after=10,
                                                     pass_judge=lambda: judge_of(made[-1][0])())
    assert resumed.validation["chosen_pass"] == chosen and resumed.final_fitness == judged.final_fitness
    for got, expected in zip([g.read() for g in groups], kept):
        assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="per_pass' needs held-out images"):
        SearchConfig(validation_selection="per_pass")
