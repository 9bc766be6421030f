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
    assert {"infonce", "mse", "cosine", "kl"} <= set(list_fitness())
    o = torch.randn(4, 10)
    for name in ("mse", "cosine", "kl"):
        assert get_fitness(name)(o, o, temperature=1.0, normalize=True).item() == pytest.approx(0.0, abs=1e-6)
        assert get_fitness(name)(o + torch.randn_like(o), o, temperature=1.0, normalize=True).item() > 0
