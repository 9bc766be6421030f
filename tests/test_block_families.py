"""Block discovery and suffix evaluation for every supported family (issue: Swin, LeViT, generic fallback)."""

import copy
import dataclasses
import logging

import pytest
import torch
from torch import nn

import cptv_plugin
from cptv_plugin import ModelStructure, discover_blocks
from cptv_plugin.fx.refine import FxSession
from cptv_plugin.models import load_reference_model
from cptv_plugin.qconfigs import prepare_timm_for_fx
from conftest import TINY_SEARCH, assert_suffix_matches_full, onnxruntime_logits, prepare_and_calibrate

FAMILIES = {
    "fmnist_vit_tiny": ("vit", [f"blocks.{i}" for i in range(4)]),
    "fmnist_swin_tiny": ("swin", ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.downsample"]
                         + [f"layers.1.blocks.{i}" for i in range(4)]),
    "fmnist_levit": ("levit", ["stages.0.blocks.0", "stages.0.blocks.1", "stages.1.downsample"]
                     + [f"stages.1.blocks.{i}" for i in range(3)]),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, fmnist):
    model = prepare_timm_for_fx(load_reference_model(request.param))
    return request.param, model, prepare_and_calibrate(model, fmnist[0][:100], "W4A8")


def test_adapter_finds_the_blocks_in_forward_order(family):
    name, model, prepared = family
    adapter, blocks = FAMILIES[name]
    assert discover_blocks(ModelStructure.from_module(model)) == (adapter, blocks)
    assert discover_blocks(ModelStructure.from_graph_module(prepared)) == (adapter, blocks)
    # forward order: the first graph node of each block comes after the first node of the previous block
    first_seen = {}
    for index, node in enumerate(prepared.graph.nodes):
        for path, _ in node.meta.get("nn_module_stack", {}).values():
            for block in blocks:
                if (path == block or path.startswith(block + ".")) and block not in first_seen:
                    first_seen[block] = index
    assert [first_seen[b] for b in blocks] == sorted(first_seen.values())


def test_every_quantizer_in_exactly_one_group_and_suffix_equals_full_forward(family, fmnist):
    name, _, prepared = family
    session = FxSession(prepared)
    in_groups = [id(h) for g in session.groups for h in g.handles]
    assert len(in_groups) == len(set(in_groups)) == len(session.all_handles)
    assert [g.name for g in session.groups] == ["prefix"] + FAMILIES[name][1] + ["head"]
    # every block got its own segment, so candidates re-run only the suffix
    segments = [g.segment for g in session.groups]
    assert segments == sorted(segments) and len(set(segments)) == len(segments)
    images = fmnist[0][:8]
    assert_suffix_matches_full(session.chain, session.groups, images)


def test_compiled_segments_trace_whole_share_identical_blocks_and_match_eager(family, fmnist):
    """torch.compile of the segments (dynamo only: the ``eager`` backend) sees each segment as one graph: a graph
    break inside a quantized layer recompiles per weight shape, and past dynamo's recompile limit (8) the model
    silently runs eagerly again (Swin-T at 224² did, on the H100). Identical blocks share one compiled graph, and
    each still computes with its own scales."""
    from torch._dynamo.utils import counters

    name, _, prepared = family
    session = FxSession(prepared)
    images = fmnist[0][:8]
    middle = session.groups[len(session.groups) // 2]  # a block whose graph is shared with its neighbours

    def scale_middle(factor):
        for handle in middle.handles:
            handle.set(handle.read() * factor)

    with torch.no_grad():
        expected = session.chain.forward(images)
        scale_middle(2.0)
        expected_scaled = session.chain.forward(images)
        scale_middle(0.5)
        torch._dynamo.reset()
        counters.clear()
        distinct = session.chain.compile(backend="eager")
        got = session.chain.forward(images)
        scale_middle(2.0)  # a changed scale is seen by the compiled code (no stale cache, no stale shared copy)
        got_scaled = session.chain.forward(images)
        scale_middle(0.5)
        again = session.chain.forward(images)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == distinct < len(session.chain.segments)
    assert not torch.equal(expected_scaled, expected)
    for compiled, eager in ((got, expected), (got_scaled, expected_scaled), (again, expected)):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


def test_refinement_lowers_the_fitness(family, fmnist):
    name, model, _ = family
    prepared = prepare_and_calibrate(model, fmnist[0][:100], "W4A8")
    before = {k: v.clone() for k, v in prepared.state_dict().items() if k.endswith("max_val")}
    result = cptv_plugin.refine_fx(prepared, fmnist[0][:100], config=TINY_SEARCH)
    assert result.final_fitness < result.initial_fitness
    assert set(result.groups) == {"prefix", "head", *FAMILIES[name][1]}
    assert before  # the observers are still there for convert_fx (activation ones were frozen, not removed)


class _Stack(nn.Module):
    """No adapter knows it: numbered blocks in a ModuleList that forward iterates."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(28, 16)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(3))
        self.out = nn.Linear(16, 10)

    def forward(self, images):
        x = self.embed(images.flatten(1, 2))  # (N, 1, 28, 28): rows as tokens
        for layer in self.layers:
            x = x + layer(x)
        return self.out(x.mean(1))


def test_generic_adapter_takes_repeated_blocks_and_says_so(fmnist, caplog):
    torch.manual_seed(0)
    model = _Stack().eval()
    with caplog.at_level(logging.INFO, logger="cptv_plugin.blocks.generic"):
        assert discover_blocks(ModelStructure.from_module(model)) == ("generic", ["layers.0", "layers.1", "layers.2"])
    assert "layers" in caplog.text
    prepared = prepare_and_calibrate(model, fmnist[0][:100], "W4A8")
    result = cptv_plugin.refine_fx(prepared, fmnist[0][:100], config=TINY_SEARCH)
    assert list(result.groups) == ["prefix", "layers.0", "layers.1", "layers.2", "head"]
    assert result.final_fitness < result.initial_fitness


def _torchvision_model(name):
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    if name == "vit":
        model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2,
                                                     hidden_dim=32, mlp_dim=64, num_classes=10)
    else:
        model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                                num_classes=10)
    for module in model.modules():  # torchvision starts the ViT head at zero: a constant output has nothing to match
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.2)
    return model.eval()


@pytest.mark.parametrize("name, blocks", [
    ("vit", ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1", "encoder.layers.encoder_layer_2"]),
    ("swin", ["features.1.0", "features.1.1", "features.3.0", "features.3.1"])])
def test_torchvision_vision_transformers_are_split_by_the_generic_adapter(name, blocks):
    """torchvision's ViT (blocks named encoder_layer_<i>) and Swin (numbered blocks in each stage) through torch.ao
    FX, the framework whose tutorials use torchvision: found blocks, exact suffixes, a search that lowers the
    fitness, and a model convert_fx takes."""
    from torch.ao.quantization.quantize_fx import convert_fx

    images = torch.randn(100, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = _torchvision_model(name)
    assert discover_blocks(ModelStructure.from_module(model)) == ("generic", blocks)
    prepared = prepare_and_calibrate(model, images, "W4A8")
    session = FxSession(prepared)
    assert [group.name for group in session.groups] == ["prefix", *blocks, "head"]
    assert_suffix_matches_full(session.chain, session.groups, images[:8])
    result = cptv_plugin.refine_fx(prepared, images, config=TINY_SEARCH)
    assert result.final_fitness < result.initial_fitness
    with torch.no_grad():
        assert convert_fx(prepared)(images[:2]).shape == (2, 10)


def test_torchvision_vit_through_pt2e_with_tensorrts_quantizer_refines_and_exports(tmp_path):
    """torchvision's ViT, exported and prepared with tensorrt_pt2e_quantizer: the exported graph's module paths give
    the same blocks, a search lowers the fitness, and the file passes TensorRT's rules."""
    pytest.importorskip("torchao")
    pytest.importorskip("onnxscript")
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from cptv_plugin.qconfigs import tensorrt_pt2e_quantizer

    images = torch.randn(100, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(_torchvision_model("vit"), (images[:2],), dynamic_shapes=({0: batch},)).module()
    prepared = prepare_pt2e(exported, tensorrt_pt2e_quantizer("W4A8"))
    with torch.no_grad():
        prepared(images)
    result = cptv_plugin.refine_pt2e(prepared, images, config=TINY_SEARCH)
    assert list(result.groups) == ["prefix", *(f"encoder.layers.encoder_layer_{i}" for i in range(3)), "head"]
    assert result.final_fitness < result.initial_fitness
    assert cptv_plugin.check_tensorrt_onnx(cptv_plugin.export_onnx(prepared, tmp_path / "vit.onnx", images[:2])) == []


def test_modelopt_torchvision_vit_leaves_out_the_layers_its_attention_bypasses(tmp_path, caplog):
    """ModelOpt quantizes nn.MultiheadAttention's out_proj, but the attention reads its weight directly: its forward
    never runs, so calibration leaves its input quantizer without amax. The refinement and the export leave that
    layer out (with a warning) instead of calling the model uncalibrated; the rest is refined and exported."""
    mtq = pytest.importorskip("modelopt.torch.quantization")
    pytest.importorskip("onnxruntime")
    from cptv_plugin.qconfigs import modelopt_config

    images = torch.randn(100, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = mtq.quantize(_torchvision_model("vit"), modelopt_config("W4A8"), lambda m: m(images))
    out_proj = model.encoder.layers.encoder_layer_0.self_attention.out_proj
    assert out_proj.input_quantizer.amax is None and out_proj.weight_quantizer.amax is not None
    weight_amax = out_proj.weight_quantizer.amax.clone()
    with caplog.at_level(logging.WARNING, logger="cptv_plugin.amax.session"):
        result = cptv_plugin.refine_modelopt(model, images, config=TINY_SEARCH)
    assert "6 enabled modelopt quantizer(s) of 3 layer(s) were never reached" in caplog.text
    assert result.final_fitness < result.initial_fitness
    assert list(result.groups) == ["prefix", *(f"encoder.layers.encoder_layer_{i}" for i in range(3)), "head"]
    assert torch.equal(out_proj.weight_quantizer.amax, weight_amax)  # left out of the search

    # the export: under no_grad nn.MultiheadAttention takes a fused kernel the TorchScript exporter cannot write
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cptv_plugin.amax.session"):
        path = cptv_plugin.export_onnx(model, tmp_path / "vit.onnx", images[:2])
    assert caplog.text.count("were never reached") == 1  # a model refined elsewhere hears of them at the export too
    assert cptv_plugin.check_tensorrt_onnx(path) == []
    logits = onnxruntime_logits(path, images)
    with torch.no_grad():
        expected = model(images)
    assert (torch.from_numpy(logits).argmax(1) == expected.argmax(1)).float().mean() >= 0.98


def _hugging_face_model(family: str = "vit"):
    """A small random-weight Hugging Face model (ViT, Swin, or DeiT with its distillation head) and the names of
    its blocks: its forward returns a ModelOutput (``ImageClassifierOutput``, ...), not a tensor."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "swin":
        model = transformers.SwinForImageClassification(transformers.SwinConfig(
            image_size=28, patch_size=2, num_channels=1, embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=7,
            num_labels=10))
    else:
        config = dict(image_size=28, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=3,
                      num_attention_heads=4, intermediate_size=128, num_labels=10)
        model = (transformers.ViTForImageClassification(transformers.ViTConfig(**config)) if family == "vit" else
                 transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**config)))
    blocks = [name for name, module in model.named_modules()
              if type(module).__name__ in ("ViTLayer", "SwinLayer", "DeiTLayer")]
    return model.eval(), blocks


@pytest.mark.parametrize("family", ["vit", "swin", "deit"])
def test_hugging_face_models_through_modelopt_refine_and_export(family, tmp_path):
    """Hugging Face's models return their logits inside a ModelOutput: the fitness and the export take them from it
    (before, the refinement raised ModelOutputError); their blocks are found by the generic adapter."""
    mtq = pytest.importorskip("modelopt.torch.quantization")
    pytest.importorskip("onnxruntime")
    from cptv_plugin.qconfigs import modelopt_config

    model, blocks = _hugging_face_model(family)
    images = torch.randn(100, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    quantized = mtq.quantize(model, modelopt_config("W4A8"), lambda m: m(images))
    before = {n: q.amax.clone() for n, q in quantized.named_modules() if getattr(q, "amax", None) is not None}
    result = cptv_plugin.refine_modelopt(quantized, images, config=TINY_SEARCH)
    assert list(result.groups) == ["prefix", *blocks, "head"] and len(blocks) == (4 if family == "swin" else 3)
    assert result.final_fitness < result.initial_fitness
    assert any(not torch.equal(q.amax, before[n]) for n, q in quantized.named_modules() if n in before)

    path = cptv_plugin.export_onnx(quantized, tmp_path / "hf.onnx", images[:2])
    assert cptv_plugin.check_tensorrt_onnx(path) == []
    logits = onnxruntime_logits(path, images)
    with torch.no_grad():
        expected = quantized(images).logits
    assert (torch.from_numpy(logits).argmax(1) == expected.argmax(1)).float().mean() >= 0.98
    assert (torch.from_numpy(logits) - expected).abs().max() < 0.2


def test_hugging_face_vit_through_pt2e_refines_and_exports(tmp_path):
    """The same model through torch.export and PT2E (TensorRT's placement): the exported module returns the
    ModelOutput too."""
    pytest.importorskip("torchao")
    pytest.importorskip("onnxscript")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from cptv_plugin.qconfigs import tensorrt_pt2e_quantizer

    model, blocks = _hugging_face_model("vit")
    images = torch.randn(100, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(model, (images[:2],), dynamic_shapes=({0: batch},)).module()
    prepared = prepare_pt2e(exported, tensorrt_pt2e_quantizer("W4A8"))
    with torch.no_grad():
        prepared(images)
    result = cptv_plugin.refine_pt2e(prepared, images, config=TINY_SEARCH, fp_model=model)
    assert list(result.groups) == ["prefix", *blocks, "head"]
    assert result.final_fitness < result.initial_fitness
    path = cptv_plugin.export_onnx(prepared, tmp_path / "hf_vit.onnx", images[:2])
    assert cptv_plugin.check_tensorrt_onnx(path) == []
    with torch.no_grad():  # what convert_pt2e computes
        expected = convert_pt2e(copy.deepcopy(prepared))(images).logits
    agreement = (torch.from_numpy(onnxruntime_logits(path, images)).argmax(1) == expected.argmax(1)).float().mean()
    assert agreement >= 0.98


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_hugging_face_models_are_cut_by_calling_their_blocks_and_search_as_the_whole_model_does(family, monkeypatch):
    """torch.fx cannot trace Hugging Face's models; they are cut between blocks by calling the blocks one by one
    (before, every candidate ran the whole model). The chain reproduces the model, Swin's patch merging belongs to
    the block it follows, and the search finds exactly the scales it finds running the whole model per candidate."""
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from cptv_plugin import block_calls
    from cptv_plugin.amax.modelopt import modelopt_kind
    from cptv_plugin.amax.session import AmaxSession
    from cptv_plugin.qconfigs import modelopt_config

    model, blocks = _hugging_face_model(family)
    images = torch.randn(100, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    quantized = mtq.quantize(model, modelopt_config("W4A8"), lambda m: m(images))
    session = AmaxSession(quantized, modelopt_kind())
    assert len(session.chain.segments) == 1  # not traceable
    session.prepare(images[:2])
    assert len(session.chain.segments) == len(blocks) + 2
    assert [g.segment for g in session.groups] == list(range(len(blocks) + 2))
    with torch.no_grad():
        assert torch.equal(session.chain.run(session.chain.initial_env(images)).logits, quantized(images).logits)

    def quantizer_calls(forward) -> list[int]:
        calls = []
        hooks = [q.register_forward_pre_hook(lambda m, a: calls.append(id(m))) for q in session.quantizers.values()]
        with torch.no_grad():
            forward(images)
        for hook in hooks:
            hook.remove()
        return sorted(calls)

    # a whole forward (the activation start gathers its statistics in one) calls each quantizer as the model does,
    # not the prefix's twice nor the patch merging's on a skipped block's input
    assert quantizer_calls(session.chain.forward) == quantizer_calls(quantized)
    twin = copy.deepcopy(quantized)
    config = dataclasses.replace(TINY_SEARCH, start_candidates=("activation_mse",))
    cut = cptv_plugin.refine_modelopt(quantized, images, config=config)
    assert cut.final_fitness < cut.initial_fitness
    if family == "swin":  # the patch merging after stage 0 runs in the segment of that stage's last block (the
        # fallback this test forces, with nothing recorded, groups it by registration order, with the head: another
        # search, so not compared)
        merging = {g.name for g in session.groups for h in g.handles if ".downsample." in h.name}
        assert merging == {blocks[1]}
        # the features before the head enter the tail: a feature-level fitness (the whole model has none)
        featured = cptv_plugin.refine_modelopt(twin, images, config=dataclasses.replace(config, feature_weight=0.5))
        assert featured.final_fitness < featured.initial_fitness
        return

    def refuse(*args, **kwargs):
        raise block_calls.CutError("refused by the test")

    monkeypatch.setattr(block_calls, "cut_between_blocks", refuse)
    whole = cptv_plugin.refine_modelopt(twin, images, config=config)
    assert cut.final_fitness == whole.final_fitness
    amax = {n: q.amax for n, q in twin.named_modules() if getattr(q, "amax", None) is not None}
    assert all(torch.equal(q.amax, amax[n]) for n, q in quantized.named_modules() if n in amax)


class _TwoTensorBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        return y, y.mean(dim=1)  # passes on two tensors: the block-call cut cannot replay it


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Linear(4, 8), nn.Linear(8, 3)
        self.blocks = nn.ModuleList(_TwoTensorBlock() for _ in range(3))
        self.mixer = nn.Linear(8, 8)  # registered after the blocks, run between the first two (as a patch merging)

    def forward(self, images):
        x = self.stem(images.flatten(1))
        for index, block in enumerate(self.blocks):
            x, summary = block(x)
            x = self.mixer(x) if index == 0 else x
        if bool(summary.sum() > 1e9):  # data-dependent control flow: torch.fx cannot trace it
            x = x * 0
        return self.head(x)


def test_a_model_neither_traced_nor_cut_by_block_calls_runs_whole_with_a_warning_that_says_why(caplog):
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from cptv_plugin.qconfigs import modelopt_config

    torch.manual_seed(0)
    images = torch.randn(100, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    quantized = mtq.quantize(_Untraceable().eval(), modelopt_config("W8A8"), lambda m: m(images))
    with caplog.at_level(logging.WARNING, logger="cptv_plugin"):
        result = cptv_plugin.refine_modelopt(quantized, images, config=TINY_SEARCH,
                                             blocks=[f"blocks.{i}" for i in range(3)])
    warning = [r.getMessage() for r in caplog.records if "every candidate runs the whole model" in r.getMessage()]
    assert len(warning) == 1 and "torch.fx cannot trace it" in warning[0]
    assert "does not take one tensor as its first argument and return one of the same shape" in warning[0]
    # grouped as the recorded forward ran them: the mixer (8 weight scales and 1 input scale, as each block's fc)
    # with the block it follows, not with the head, where its name would put it
    assert result.groups == {"prefix": 9, "blocks.0": 18, "blocks.1": 9, "blocks.2": 9, "head": 4}


def test_hugging_face_vit_through_pytorch_quantization_refines():
    pytest.importorskip("pytorch_quantization")
    model, blocks = _hugging_face_model("vit")
    images = torch.randn(100, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    quantized = cptv_plugin.quantize_pytorch_quantization(model, "W4A8", images)
    result = cptv_plugin.refine(quantized, images, config=TINY_SEARCH)
    assert list(result.groups) == ["prefix", *blocks, "head"]
    assert result.final_fitness < result.initial_fitness


def test_pytorch_quantization_keeps_in_float_the_layers_torchvision_swin_bypasses():
    """torchvision's Swin attention reads qkv.weight and proj.weight directly: calibration never reaches those
    layers, so quantize_pytorch_quantization gives them back their float module instead of failing on a calibrator
    that saw nothing; the rest is quantized and refined."""
    pytest.importorskip("pytorch_quantization")
    from pytorch_quantization import nn as quant_nn

    images = torch.randn(100, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = cptv_plugin.quantize_pytorch_quantization(_torchvision_model("swin"), "W4A8", images)
    attention, mlp = model.features[1][0].attn, model.features[1][0].mlp
    assert type(attention.qkv) is nn.Linear and type(attention.proj) is nn.Linear
    assert isinstance(mlp[0], quant_nn.QuantLinear) and mlp[0]._input_quantizer.amax is not None
    result = cptv_plugin.refine_pytorch_quantization(model, images, config=TINY_SEARCH)
    assert result.final_fitness < result.initial_fitness


def test_generic_adapter_prefers_the_innermost_run():
    structure = ModelStructure({
        "stages": "torch.nn.modules.container.Sequential",
        "stages.0": "my.Stage", "stages.0.blocks": "torch.nn.modules.container.Sequential",
        "stages.0.blocks.0": "my.Block", "stages.0.blocks.0.fc": "torch.nn.modules.linear.Linear",
        "stages.0.blocks.1": "my.Block", "stages.0.blocks.1.fc": "torch.nn.modules.linear.Linear",
        "stages.1": "my.Stage", "stages.1.blocks": "torch.nn.modules.container.Sequential",
        "stages.1.blocks.0": "my.Block", "stages.1.blocks.0.fc": "torch.nn.modules.linear.Linear",
        "stages.1.blocks.1": "my.Block", "stages.1.blocks.1.fc": "torch.nn.modules.linear.Linear",
    })
    assert discover_blocks(structure) == ("generic", ["stages.0.blocks.0", "stages.0.blocks.1",
                                                      "stages.1.blocks.0", "stages.1.blocks.1"])


def test_a_registered_adapter_wins_over_the_generic_fallback():
    import sys
    sys.path.insert(0, "examples")
    from custom_block_adapter import MyTransformer

    assert discover_blocks(ModelStructure.from_module(MyTransformer()))[0] == "my-transformer"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_adapters_serve_modelopt_models_too(name, fmnist):
    """The same adapters split ModelOpt models (eager, traced with quantizer-owning modules as leaves)."""
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from cptv_plugin.amax.modelopt import modelopt_kind
    from cptv_plugin.amax.session import AmaxSession
    from test_amax_frameworks import modelopt_config

    calib = fmnist[0][:100]
    model = mtq.quantize(load_reference_model(name), modelopt_config(4, 8), lambda m: m(calib))
    session = AmaxSession(model, modelopt_kind())
    assert session.adapter == FAMILIES[name][0]
    assert [g.name for g in session.groups if g.name not in ("prefix", "head")] == FAMILIES[name][1]
    assert len({id(h) for g in session.groups for h in g.handles}) == len(session.all_handles)
    images = fmnist[0][:8]
    with torch.no_grad():
        full = model(images)
    assert_suffix_matches_full(session.chain, session.groups, images, full)
    result = cptv_plugin.refine_modelopt(model, calib, config=TINY_SEARCH)
    assert result.final_fitness < result.initial_fitness


@pytest.mark.parametrize("name", list(FAMILIES))
def test_adapters_serve_pytorch_quantization_models_too(name, fmnist):
    pytest.importorskip("pytorch_quantization")
    from cptv_plugin.amax.pytorch_quantization import pytorch_quantization_kind
    from cptv_plugin.amax.session import AmaxSession

    calib = fmnist[0][:100]
    model = cptv_plugin.quantize_pytorch_quantization(load_reference_model(name), "W4A8", calib)
    session = AmaxSession(model, pytorch_quantization_kind())
    assert session.adapter == FAMILIES[name][0]
    assert [g.name for g in session.groups if g.name not in ("prefix", "head")] == FAMILIES[name][1]
    assert_suffix_matches_full(session.chain, session.groups, fmnist[0][:8])
    result = cptv_plugin.refine_pytorch_quantization(model, calib, config=TINY_SEARCH)
    assert result.final_fitness < result.initial_fitness
