"""Fine-to-coarse search units: sub-units of a block, whole blocks, pairs of blocks."""

import torch

import cptv_plugin
from cptv_plugin import SearchConfig
from cptv_plugin.fx.refine import FxSession
from cptv_plugin.granularity import pairs, sub_units, visit_plan
from conftest import TINY_SEARCH, prepare_and_calibrate


def test_a_vit_block_splits_into_attention_and_mlp_in_graph_order(tiny_vit, fmnist):
    session = FxSession(prepare_and_calibrate(tiny_vit, fmnist[0][:100], "W4A8"))
    prefix, block = session.groups[0], session.groups[1]
    assert sub_units(prefix) == [prefix]  # its handles name no child of a block: stays whole
    attn, mlp = sub_units(block)
    assert (attn.name, mlp.name) == (f"{block.name}.attn", f"{block.name}.mlp")
    assert attn.handles + mlp.handles == block.handles  # a partition, in order
    assert attn.segment == mlp.segment == block.segment
    named = lambda unit: [h.name for h in unit.handles if not h.name.startswith("activation_post_process")]
    assert all(".attn." in n for n in named(attn)) and all(".mlp." in n for n in named(mlp))
    # the observer right before mlp.fc1's weight (fc1's input) belongs to the MLP
    fc1 = [h.name for h in block.handles].index(f"{block.name}.mlp.fc1.weight")
    assert block.handles[fc1 - 1] in mlp.handles


def test_pairs_merge_consecutive_groups_and_rerun_from_the_first(tiny_vit, fmnist):
    session = FxSession(prepare_and_calibrate(tiny_vit, fmnist[0][:100], "W4A8"))
    groups = session.groups
    merged = pairs(groups)
    assert len(merged) == (len(groups) + 1) // 2
    assert merged[0].name == f"{groups[0].name}+{groups[1].name}"
    assert merged[0].handles == groups[0].handles + groups[1].handles
    assert merged[0].segment == min(groups[0].segment, groups[1].segment)


def test_fine_to_coarse_plan_visits_sub_units_then_blocks_then_pairs(tiny_vit, fmnist):
    session = FxSession(prepare_and_calibrate(tiny_vit, fmnist[0][:100], "W4A8"))
    groups = session.groups
    units, visits = visit_plan(groups, 10, "fine_to_coarse")
    names = [[units[u].name for p, u in visits if p == k] for k in range(10)]
    fine = [u.name for g in groups for u in sub_units(g)]
    assert names[:3] == [fine] * 3 and len(fine) > len(groups)
    assert names[3:7] == [[g.name for g in groups]] * 4
    assert names[7:] == [[g.name for g in pairs(groups)]] * 3
    units, visits = visit_plan(groups, 2, "block", reverse=True)
    assert units == groups and [u for _, u in visits] == list(reversed(range(len(groups)))) * 2


def test_a_fine_to_coarse_search_lowers_the_fitness_and_reports_its_units(tiny_vit, fmnist):
    calib = fmnist[0][:100]
    prepared = prepare_and_calibrate(tiny_vit, calib, "W3A8")
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    config = TINY_SEARCH.replace(passes=3, population=3, cycles=1, granularity="fine_to_coarse")
    result = cptv_plugin.refine_fx(prepared, calib, config=config)
    assert result.final_fitness < result.initial_fitness
    visited = {k: [h["group"] for h in result.history if h["pass"] == k] for k in range(3)}
    assert "blocks.0.attn" in visited[0] and "blocks.0.mlp" in visited[0]
    assert list(result.groups) == visited[1]  # results name the model's groups, not the units
    assert len(visited[2]) == (len(visited[1]) + 1) // 2 and all("+" in name for name in visited[2][:-1])
    after = prepared.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)


def test_an_unknown_granularity_is_refused():
    import pytest

    with pytest.raises(ValueError, match="granularity"):
        SearchConfig(granularity="per_layer").validate()


def test_an_interrupted_fine_to_coarse_search_resumes_to_the_same_scales(tmp_path, monkeypatch):
    """The plan of visits (sub-units, blocks, pairs) is derived from the config and the per-unit steps are saved:
    interrupted in the pairs' pass and resumed, the search ends with exactly the uninterrupted scales."""
    from cptv_plugin.handles import Group
    from cptv_plugin.search import evolutionary_search
    from test_search import QuadraticEvaluator, TensorHandle, interrupt_and_resume

    def problem():
        groups = [Group(f"blocks.{i}", [TensorHandle(f"blocks.{i}.{child}.weight", torch.ones(3))
                                        for child in ("attn", "mlp")], segment=i) for i in range(3)]
        return groups, QuadraticEvaluator(groups, [torch.full((6,), 1.5) for _ in groups])

    config = SearchConfig(passes=3, population=4, cycles=2, samples=2, progress=False, granularity="fine_to_coarse",
                          step_adaptation="one_fifth", checkpoint_path=str(tmp_path / "a.ckpt"))
    groups, evaluator = problem()
    done = evolutionary_search(groups, evaluator, config, fingerprint="toy")
    assert [h["group"] for h in done.history] == [
        "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp", "blocks.2.attn", "blocks.2.mlp",
        "blocks.0", "blocks.1", "blocks.2", "blocks.0+blocks.1", "blocks.2"]
    uninterrupted = [g.read() for g in groups]
    # stopped after the first pair
    _, resumed, groups, _ = interrupt_and_resume(problem, config, tmp_path, monkeypatch, stop_after=10)
    assert resumed.resumed_from == 10
    for got, expected in zip([g.read() for g in groups], uninterrupted):
        assert torch.equal(got, expected)
