"""Resumable searches, never-worse guard, interrupts, and property-based invariants."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cptv_plugin
from cptv_plugin import CalibrationError, SearchConfig
from cptv_plugin.search import CheckpointMismatchError, evolutionary_search
from conftest import TINY_SEARCH, environment_with_this_package, prepare_and_calibrate
from test_search import make_problem

WORKER = Path(__file__).with_name("resume_worker.py")


def run_worker(checkpoint: Path, out: Path, kill_after_visits: int | None = None) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, str(WORKER), str(checkpoint), str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment_with_this_package())
    if kill_after_visits is None:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err.decode()[-2000:]
        return process
    deadline = time.time() + 600
    while time.time() < deadline:
        if checkpoint.exists():
            try:
                if torch.load(checkpoint, weights_only=True)["next_visit"] >= kill_after_visits:
                    break
            except Exception:  # being replaced right now: look again
                pass
        assert process.poll() is None, "the worker finished before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return process


def test_killed_search_resumes_to_exactly_the_uninterrupted_scales(tmp_path):
    run_worker(tmp_path / "a.ckpt", tmp_path / "a.pt")
    uninterrupted = torch.load(tmp_path / "a.pt", weights_only=True)
    assert not (tmp_path / "a.ckpt").exists() and uninterrupted["resumed_from"] is None

    killed = run_worker(tmp_path / "b.ckpt", tmp_path / "b.pt", kill_after_visits=5)
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "b.pt").exists()
    assert (tmp_path / "b.ckpt").exists()
    run_worker(tmp_path / "b.ckpt", tmp_path / "b.pt")
    resumed = torch.load(tmp_path / "b.pt", weights_only=True)
    assert resumed["resumed_from"] >= 5
    assert resumed["final_fitness"] == uninterrupted["final_fitness"]
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted["scales"], resumed["scales"]))


def test_checkpoint_of_another_config_is_refused_and_model_untouched(tiny_vit, fmnist, tmp_path):
    calib = fmnist[0][:100]
    checkpoint = tmp_path / "search.ckpt"
    config = TINY_SEARCH.replace(passes=2, checkpoint_path=str(checkpoint))
    prepared = prepare_and_calibrate(tiny_vit, calib, "W4A8")
    # Ctrl-C after the first visit: the search keeps its best scales and leaves its checkpoint for a resume
    assert _interrupt_after(prepared, calib, config, visits=1).interrupted
    assert checkpoint.exists()
    other = prepare_and_calibrate(tiny_vit, calib, "W4A8")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="another model, config or calibration set"):
        cptv_plugin.refine_fx(other, calib, config=config.replace(seed=1))
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def _interrupt_after(prepared, calib, config, visits):
    """Run refine_fx and raise KeyboardInterrupt (as Ctrl-C) once ``visits`` group visits were checkpointed."""
    import cptv_plugin.search as search

    original = search._save_checkpoint
    count = {"n": 0}

    def save_then_interrupt(path, state):
        original(path, state)
        count["n"] += 1
        if count["n"] >= visits:
            raise KeyboardInterrupt

    search._save_checkpoint = save_then_interrupt
    try:
        return cptv_plugin.refine_fx(prepared, calib, config=config)
    finally:
        search._save_checkpoint = original


@pytest.mark.parametrize("on_interrupt", ["keep_best", "restore"])
def test_ctrl_c_leaves_best_or_initial_scales(tiny_vit, fmnist, on_interrupt, monkeypatch):
    from cptv_plugin.engine import Evaluator

    calib = fmnist[0][:100]
    prepared = prepare_and_calibrate(tiny_vit, calib, "W4A8")
    original_call = Evaluator.__call__
    calls = {"n": 0}

    def interrupting(self, segment=None):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        return original_call(self, segment)

    monkeypatch.setattr(Evaluator, "__call__", interrupting)
    result = cptv_plugin.refine_fx(prepared, calib, config=TINY_SEARCH.replace(on_interrupt=on_interrupt))
    assert result.interrupted
    from cptv_plugin.fx.refine import FxSession

    fresh = prepare_and_calibrate(tiny_vit, calib, "W4A8")
    initial = [h.read() for h in FxSession(fresh).all_handles]
    now = [h.read() for h in FxSession(prepared).all_handles]
    if on_interrupt == "restore":
        assert result.final_fitness == result.initial_fitness
        assert all(torch.equal(a, b) for a, b in zip(initial, now))
    else:
        assert result.final_fitness < result.initial_fitness
        assert any(not torch.equal(a, b) for a, b in zip(initial, now))


def test_validation_split_reports_and_guards(tiny_vit, fmnist):
    calib = fmnist[0][:200]
    prepared = prepare_and_calibrate(tiny_vit, calib, "W4A8")
    result = cptv_plugin.refine_fx(prepared, calib, config=TINY_SEARCH.replace(validation_fraction=0.25))
    check = result.validation
    assert check["images"] == 50 and check["restored"] == (check["final"] > check["initial"])
    # per pass: the held-out images score the start and every pass; the search ends at the best of them
    prepared = prepare_and_calibrate(tiny_vit, calib, "W2A8")
    result = cptv_plugin.refine_fx(prepared, calib, config=TINY_SEARCH.replace(
        passes=2, validation_fraction=0.25, validation_selection="per_pass", start_candidates=()))
    check = result.validation
    assert len(check["passes"]) == 3 and check["passes"][check["chosen_pass"] + 1] == min(check["passes"])
    assert check["initial"] == pytest.approx(check["passes"][0], rel=1e-5)  # the search starts from the given scales
    assert check["final"] == pytest.approx(min(check["passes"]), rel=1e-5) and not check["restored"]


def test_held_out_reference_is_full_precision_in_a_compiled_search(tiny_vit, fmnist, monkeypatch):
    """Compiled segments do not see quantization switched off: the held-out reference, taken after compiling,
    ran through them and was the quantized model's own output, so every search looked worse on the held-out
    images (found on the H100: 23 of 35 W8A8/W4A8 runs and every lower-bit run restored). References run eagerly."""
    import cptv_plugin.refinement as refinement
    from cptv_plugin.engine import SegmentedModel

    compile_eagerly = SegmentedModel.compile
    monkeypatch.setattr(SegmentedModel, "compile", lambda self, **options: compile_eagerly(self, backend="eager"))

    def no_search(groups, evaluator, config, fingerprint="", starts=None, given_agreement=None, pass_judge=None):
        fitness = evaluator(None)
        return cptv_plugin.RefineResult(initial_fitness=fitness, final_fitness=fitness)

    monkeypatch.setattr(refinement, "evolutionary_search", no_search)
    calib = fmnist[0][:200]
    held_out = {}
    for compile in (False, True):
        prepared = prepare_and_calibrate(tiny_vit, calib, "W2A8")
        config = TINY_SEARCH.replace(validation_fraction=0.25, compile=compile)
        result = cptv_plugin.refine_fx(prepared, calib, config=config)
        assert result.compiled == float(compile)
        held_out[compile] = result.validation["initial"]
    assert held_out[True] == pytest.approx(held_out[False], abs=1e-4)


def test_worse_on_held_out_images_restores_the_initial_scales(tiny_vit, fmnist, monkeypatch):
    import cptv_plugin.refinement as refinement
    from cptv_plugin.fx.refine import FxSession

    def harmful_search(groups, evaluator, config, fingerprint="", starts=None, given_agreement=None, pass_judge=None):
        initial = evaluator(None)
        for group in groups:
            group.set(group.read() * 4)  # much worse everywhere, the held-out images too
        return cptv_plugin.RefineResult(initial_fitness=initial, final_fitness=initial)

    monkeypatch.setattr(refinement, "evolutionary_search", harmful_search)
    calib = fmnist[0][:200]
    prepared = prepare_and_calibrate(tiny_vit, calib, "W4A8")
    initial = [h.read() for h in FxSession(prepare_and_calibrate(tiny_vit, calib, "W4A8")).all_handles]
    result = cptv_plugin.refine_fx(prepared, calib, config=TINY_SEARCH.replace(validation_fraction=0.25))
    assert result.validation["restored"] and result.validation["final"] > result.validation["initial"]
    assert all(torch.equal(a, b) for a, b in zip(initial, [h.read() for h in FxSession(prepared).all_handles]))


def test_agreement_guard_restores_scales_that_make_the_model_disagree(tiny_vit, fmnist, monkeypatch):
    """A search that reports a lower fitness but drives the outputs to nonsense (what the default did to a
    collapsed LeViT at e2e W3A4) is undone by the label-free top-1 agreement check."""
    import cptv_plugin.refinement as refinement
    from cptv_plugin.fx.refine import FxSession

    def collapsing_search(groups, evaluator, config, fingerprint="", starts=None, given_agreement=None,
                          pass_judge=None):
        initial = evaluator(None)
        for group in groups:
            group.set(group.read() * 50)  # coarse steps everywhere: the predictions stop matching
        return cptv_plugin.RefineResult(initial_fitness=initial, final_fitness=initial - 1.0)

    monkeypatch.setattr(refinement, "evolutionary_search", collapsing_search)
    calib = fmnist[0][:200]
    prepared = prepare_and_calibrate(tiny_vit, calib, "W4A8")
    initial = [h.read() for h in FxSession(prepare_and_calibrate(tiny_vit, calib, "W4A8")).all_handles]
    unguarded = cptv_plugin.refine_fx(prepare_and_calibrate(tiny_vit, calib, "W4A8"), calib, config=TINY_SEARCH)
    assert unguarded.agreement is None
    result = cptv_plugin.refine_fx(prepared, calib, config=TINY_SEARCH.replace(agreement_guard=True))
    check = result.agreement
    assert check["restored"] and check["final"] < check["initial"] and check["initial"] > 0.5
    assert result.final_fitness == result.initial_fitness
    assert all(torch.equal(a, b) for a, b in zip(initial, [h.read() for h in FxSession(prepared).all_handles]))


def test_agreement_guard_reports_before_and_after_on_a_real_search(tiny_vit, fmnist):
    from cptv_plugin.fx.refine import FxSession

    calib = fmnist[0][:200]
    prepared = prepare_and_calibrate(tiny_vit, calib, "W2A8")
    before = [h.read() for h in FxSession(prepared).all_handles]
    result = cptv_plugin.refine_fx(prepared, calib, config=TINY_SEARCH.replace(agreement_guard=True))
    check = result.agreement
    after = [h.read() for h in FxSession(prepared).all_handles]
    assert check["restored"] == (check["final"] < check["initial"])
    assert 0.0 <= check["initial"] <= 1.0 and 0.0 <= check["final"] <= 1.0
    if check["restored"]:
        assert all(torch.equal(a, b) for a, b in zip(before, after))
    else:  # the search found better scales on this W2A8 model and they agree at least as often
        assert result.final_fitness < result.initial_fitness and check["final"] >= check["initial"]
        assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_calibration_set_smaller_than_a_batch_is_refused(tiny_vit, fmnist):
    prepared = prepare_and_calibrate(tiny_vit, fmnist[0][:100], "W4A8")
    with pytest.raises(CalibrationError, match="batch_size=50"):
        cptv_plugin.refine_fx(prepared, fmnist[0][:30], config=TINY_SEARCH)


# ------------------------------------------------------------------------------------ property-based tests


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(min_value=1e-6, max_value=1e3, allow_nan=False), min_size=1, max_size=8))
def test_amax_handle_round_trips_scales(values):
    from cptv_plugin.amax.session import AmaxHandle, QuantizerKind

    class Quantizer(torch.nn.Module):
        num_bits, unsigned, narrow_range = 4, False, False

        def __init__(self, n):
            super().__init__()
            self.amax = torch.ones(n, 1)

    kind = QuantizerKind("test", Quantizer, lambda q: True, lambda q: None, lambda q: None, lambda q: False)
    quantizer = Quantizer(len(values))
    handle = AmaxHandle("q", quantizer, "weight", kind)
    scale = torch.tensor(values, dtype=torch.float32).reshape(-1, 1)
    handle.set(scale)
    torch.testing.assert_close(handle.read(), scale, rtol=1e-6, atol=0)
    assert handle.quant_min == -8 and handle.quant_max == 7


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(min_value=1e-6, max_value=1e3, allow_nan=False), min_size=1, max_size=8))
def test_fx_observer_handle_round_trips_scales(values):
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    from cptv_plugin.fx.handles import ObserverHandle

    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    observer(torch.randn(len(values), 3))
    root = torch.nn.Module()
    root.obs = observer
    handle = ObserverHandle(root, "obs", observer, clamp_to_dtype=True)
    scale = torch.tensor(values, dtype=torch.float32)
    handle.set(scale)
    assert torch.equal(handle.read(), scale)
    handle.commit()
    refined_scale, _ = root.obs.calculate_qparams()
    assert torch.equal(refined_scale, scale)


@settings(max_examples=20, deadline=None)
@given(passes=st.integers(1, 3), population=st.integers(2, 6), cycles=st.integers(0, 4), groups=st.integers(1, 4),
       seed=st.integers(0, 10_000), data=st.data())
def test_search_invariants(passes, population, cycles, groups, seed, data):
    samples = data.draw(st.integers(1, population))
    config = SearchConfig(passes=passes, population=population, cycles=cycles, samples=samples, seed=seed,
                          progress=False)
    problem, evaluator = make_problem(n_groups=groups)
    result = evolutionary_search(problem, evaluator, config)
    fitness = [h["fitness"] for h in result.history]
    assert all(b <= a for a, b in zip([result.initial_fitness] + fitness, fitness))  # never increases
    assert result.final_fitness == fitness[-1] <= result.initial_fitness
    assert result.evaluations == 1 + passes * groups * (population - 1 + cycles)
    assert evaluator() == pytest.approx(result.final_fitness)  # the model holds the best scales found


@pytest.mark.parametrize("changes, message", [
    ({"samples": 20}, "samples"), ({"passes": -1}, "passes"), ({"mutation": -1e-3}, "mutation"),
    ({"validation_fraction": 1.5}, "validation_fraction"), ({"precision": "int4"}, "precision"),
    ({"on_interrupt": "ignore"}, "on_interrupt"), ({"compile": "yes"}, "compile"),
])
def test_impossible_configs_name_the_setting(changes, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig(**changes)


def test_compile_auto_means_cuda_only_and_an_explicit_choice_wins():
    assert SearchConfig().compile == "auto"
    assert SearchConfig().resolved_compile("cuda") and not SearchConfig().resolved_compile("cpu")
    assert SearchConfig(compile=True).resolved_compile("cpu")
    assert not SearchConfig(compile=False).resolved_compile("cuda")


def test_non_finite_scales_in_the_given_model_are_refused_untouched(tiny_vit, fmnist):
    calib = fmnist[0][:100]
    prepared = prepare_and_calibrate(tiny_vit, calib, "W4A8")
    observer = next(m for n, m in prepared.named_modules() if n.startswith("activation_post_process"))
    observer.max_val.fill_(float("inf"))
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    with pytest.raises(ValueError, match="activation_post_process"):
        cptv_plugin.refine_fx(prepared, calib, config=TINY_SEARCH)
    after = prepared.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_segment_that_fails_to_compile_runs_eagerly(tiny_vit, fmnist, caplog):
    """torch.compile can fail inside dynamo on some torch/framework pairs (torch 2.11 on ModelOpt's dynamic
    modules did on the GPU): the segment falls back to its eager self, says so, and computes the same outputs."""
    from cptv_plugin.fx.refine import FxSession

    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("backend broke")

    session = FxSession(prepare_and_calibrate(tiny_vit, fmnist[0][:100], "W4A8"))
    images = fmnist[0][:8]
    with torch.no_grad():
        expected = session.chain.forward(images)
        session.chain.compile(backend=failing_backend)
        assert session.chain.compiled_fraction == 1.0  # nothing has been compiled yet: graphs compile on first use
        with caplog.at_level("WARNING", logger="cptv_plugin.engine"):
            got = session.chain.forward(images)
    assert torch.equal(got, expected)
    assert session.chain.compiled_fraction == 0.0
    assert any("runs eagerly" in r.message and "backend broke" in r.message for r in caplog.records)


def test_a_compiled_search_leaves_the_segments_before_its_first_group_eager(tiny_vit, fmnist, monkeypatch):
    """Segments before the first searched group run only to fill the cache, once per pass: compiling them costs
    seconds for nothing (ViT-B/16's patch embedding: 5.5 s on an H100), so a compiled search leaves them eager."""
    from cptv_plugin.engine import SegmentedModel, _CompiledOrEager

    calls = []
    compile_eagerly = SegmentedModel.compile

    def recording_compile(self, start=0, **options):
        calls.append((self, start))
        return compile_eagerly(self, start, backend="eager")

    monkeypatch.setattr(SegmentedModel, "compile", recording_compile)
    calib = fmnist[0][:100]
    config = TINY_SEARCH.replace(population=2, cycles=1, search_outside_blocks=False, compile=True)
    result = cptv_plugin.refine_fx(prepare_and_calibrate(tiny_vit, calib, "W4A8"), calib, config=config)
    (chain, start), = calls
    assert start == 1  # the CI ViT: segment 0 is the patch embedding, the blocks start at 1
    assert not isinstance(chain.segments[0].fn, _CompiledOrEager)
    assert all(isinstance(s.fn, _CompiledOrEager) for s in chain.segments[1:])
    assert result.compiled == 1.0  # every segment a candidate runs
    calls.clear()
    cptv_plugin.refine_fx(prepare_and_calibrate(tiny_vit, calib, "W4A8"), calib,
                          config=config.replace(search_outside_blocks=True))
    assert calls[0][1] == 0


def test_a_start_far_from_the_full_precision_model_is_reported(tiny_vit, fmnist, caplog):
    """A calibration far off the full-precision model (4-bit activations on every op of the CI ViT: ~10 %
    top-1) gets a warning that names better starts; a sound one (W8A8) does not; nor does a far-off one that the
    search left for its activation start."""
    calib = fmnist[0][:200]
    one_look = TINY_SEARCH.replace(population=2, cycles=0, samples=1, start_candidates=())
    with caplog.at_level("WARNING", logger="cptv_plugin.refinement"):
        sound = cptv_plugin.refine_fx(prepare_and_calibrate(tiny_vit, calib, "W8A8"), calib, config=one_look)
    assert sound.initial_agreement > 0.9 and "HistogramObserver" not in caplog.text
    with caplog.at_level("WARNING", logger="cptv_plugin.refinement"):
        poor = cptv_plugin.refine_fx(prepare_and_calibrate(tiny_vit, calib, "W4A4"), calib, config=one_look)
    assert poor.initial_agreement < 0.5
    assert "far off" in caplog.text and "HistogramObserver" in caplog.text and "gptq" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cptv_plugin.refinement"):
        started = cptv_plugin.refine_fx(prepare_and_calibrate(tiny_vit, calib, "W4A4"), calib, target="fake_quant",
                                        config=one_look.replace(start_candidates=("activation_mse",)))
    assert started.initial_agreement < 0.5 and started.start["chosen"] == "activation_mse"
    assert "far off" not in caplog.text
