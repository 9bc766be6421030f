import math

import pytest
import torch

from cptv_plugin.fitness import get_fitness, list_fitness


def paper_infonce(p, o, tau):
    """Eq. 3 written out with loops: −log(exp(p_i·o_i/τ) / (exp(p_i·o_i/τ) + Σ_{j≠i} exp(p_i·o_j/τ)))."""
    total = 0.0
    for i in range(len(p)):
        positive = math.exp(float(p[i] @ o[i]) / tau)
        negatives = sum(math.exp(float(p[i] @ o[j]) / tau) for j in range(len(p)) if j != i)
        total += -math.log(positive / (positive + negatives))
    return total / len(p)


@pytest.mark.parametrize("tau", [0.1, 1.0, 3.0])
def test_infonce_matches_equation_3(tau):
    torch.manual_seed(0)
    p, o = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    got = get_fitness("infonce")(p, o, temperature=tau, normalize=False)
    assert got.item() == pytest.approx(paper_infonce(p.float(), o.float(), tau), rel=1e-5)
    pn, on = torch.nn.functional.normalize(p, dim=1), torch.nn.functional.normalize(o, dim=1)
    got = get_fitness("infonce")(p, o, temperature=tau, normalize=True)
    assert got.item() == pytest.approx(paper_infonce(pn.float(), on.float(), tau), rel=1e-5)


def test_infonce_prefers_matching_outputs():
    torch.manual_seed(0)
    o = torch.randn(8, 10)
    close = get_fitness("infonce")(o + 0.01 * torch.randn_like(o), o, temperature=0.1, normalize=True)
    shuffled = get_fitness("infonce")(o[torch.randperm(8)], o, temperature=0.1, normalize=True)
    assert close < shuffled


def test_other_fitnesses_available_and_zero_on_identity():
    assert {"infonce", "mse", "cosine", "kl", "hessian"} <= set(list_fitness())
    o = torch.randn(4, 10)
    for name in ("mse", "cosine", "kl", "hessian"):
        assert get_fitness(name)(o, o, temperature=1.0, normalize=True).item() == pytest.approx(0.0, abs=1e-6)
        assert get_fitness(name)(o + torch.randn_like(o), o, temperature=1.0, normalize=True).item() > 0


def test_hessian_weights_the_logit_error_by_the_squared_cross_entropy_gradient_at_the_fp_top1():
    torch.manual_seed(0)
    reference, quantized = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    logits = reference.clone().requires_grad_()
    torch.nn.functional.cross_entropy(logits, reference.argmax(1), reduction="sum").backward()
    expected = (logits.grad.square() * (quantized - reference).square()).sum(1).mean()
    assert get_fitness("hessian")(quantized, reference).item() == pytest.approx(expected.item(), rel=1e-5)
    # an error of the same size matters far less on an image the FP model is sure of than on an uncertain one,
    # where MSE cannot tell them apart
    sure, unsure = torch.tensor([[12.0, 0.0, 0.0]]), torch.tensor([[0.2, 0.0, 0.0]])
    error = torch.tensor([[-1.0, 1.0, 0.0]])
    hessian, mse = get_fitness("hessian"), get_fitness("mse")
    assert mse(sure + error, sure) == mse(unsure + error, unsure)
    assert hessian(sure + error, sure) < 1e-3 * hessian(unsure + error, unsure)


def test_a_search_and_a_gradient_stage_each_lower_the_hessian_metric(tiny_vit, fmnist):
    import cptv_plugin
    from conftest import prepare_and_calibrate

    calibration = fmnist[0]
    common = dict(progress=False, start_candidates=(), seed_candidates=(), lossless_kl=0.0)
    searched = prepare_and_calibrate(tiny_vit, calibration, bits="W2A8")
    result = cptv_plugin.refine_fx(searched, calibration, config=cptv_plugin.SearchConfig(
        passes=1, population=3, cycles=1, samples=2, fitness="hessian", gradient_steps=0, **common))
    assert result.final_fitness < result.initial_fitness
    # the metric is differentiable: the stage alone (no search) lowers it, from the MinMax scales
    stepped = prepare_and_calibrate(tiny_vit, calibration, bits="W2A8")
    result = cptv_plugin.refine_fx(stepped, calibration, config=cptv_plugin.SearchConfig(
        passes=0, fitness="hessian", gradient_fitness="hessian", gradient_steps=40, gradient_lr=1e-4, **common))
    stage = result.gradient
    assert stage["fitness"] == "hessian" and stage["loss_after"] < stage["loss_before"] and stage["kept"]
