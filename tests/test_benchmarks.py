"""The benchmark scripts run (small), record what they claim, and take ImageNet-layout folders."""

import base64
import json

import numpy as np
import pytest
import torch


def test_accuracy_benchmark_cpu_path_records_and_reports(tmp_path):
    pytest.importorskip("modelopt")
    from benchmarks.accuracy import main

    out = tmp_path / "accuracy.json"
    argv = ["--models", "fmnist_vit_tiny", "--bits", "W3A8", "--methods", "fp32", "baseline", "smoke",
            "modelopt-mse+smoke", "--seeds", "0", "--calibration", "100", "--test-images", "300",
            "--device", "cpu", "--out", str(out)]
    main(argv)
    records = json.loads(out.read_text())
    methods = {(r["placement"], r["method"]) for r in records}
    assert methods == {("e2e", "fp32"), ("e2e", "baseline"), ("e2e", "smoke"), ("linear", "fp32"),
                       ("linear", "baseline"), ("linear", "smoke"), ("linear", "modelopt-mse+smoke"),
                       ("pt2e", "fp32"), ("pt2e", "baseline"), ("pt2e", "smoke")}
    assert {r["framework"] for r in records} == {"fx", "modelopt", "pt2e"}
    for r in records:
        assert {"model", "bits", "method", "seed", "top1", "seconds", "evaluations", "device", "placement",
                "framework"} <= r.keys()
        assert 0 <= r["top1"] <= 100
    searched = [r for r in records if r["method"].endswith("smoke")]
    assert all(r["evaluations"] > 0 and r["fitness"][1] < r["fitness"][0] for r in searched)
    # per-image verdicts and the distance from FP32 on the test set, and the paired test they allow
    from benchmarks.accuracy import correct_images, cost_report, paired_report, paired_test

    run = {(r["placement"], r["method"]): r for r in records}
    for r in records:
        assert correct_images(r).float().mean().item() * 100 == pytest.approx(r["top1"])
    assert run["e2e", "fp32"]["fp32_fidelity"] == {"agreement": 100.0, "kl": 0.0}
    assert run["e2e", "baseline"]["fp32_fidelity"]["kl"] > 0
    baseline, refined = run["e2e", "baseline"], run["e2e", "smoke"]
    test = paired_test(refined, baseline)
    assert test["only_first"] - test["only_second"] == round((refined["top1"] - baseline["top1"]) * 3)
    assert 0 < test["p"] <= 1
    assert paired_test(baseline, baseline) == {"only_first": 0, "only_second": 0, "p": 1.0}
    with pytest.raises(ValueError, match="same test images"):
        paired_test(baseline, dict(refined, test_images=200))
    assert f"| fmnist_vit_tiny | e2e | W3A8 | 0 | {baseline['top1']:.2f} / " in paired_report(
        records, methods=("baseline", "smoke"))
    gain = refined["top1"] - baseline["top1"]
    assert f"| fmnist_vit_tiny | e2e | W3A8 | {gain:+.2f} / {refined['seconds']:.0f} / " in cost_report(
        records, methods=("smoke",))
    main(argv)  # recorded runs are skipped, not repeated
    assert len(json.loads(out.read_text())) == len(records)
    table = (tmp_path / "accuracy.md").read_text()
    assert "| fmnist_vit_tiny | e2e | W3A8 |" in table


def test_accuracy_benchmark_workers_share_the_tasks_once_each(tmp_path):
    from benchmarks.accuracy import main, tasks

    out = tmp_path / "accuracy.json"
    argv = ["--models", "fmnist_vit_tiny", "--bits", "W4A8", "W2A8", "--placements", "e2e", "--methods", "fp32",
            "baseline", "smoke@fp32", "--seeds", "0", "--calibration", "100", "--test-images", "200",
            "--device", "cpu", "--out", str(out)]
    main(argv[:-2] + ["--methods", "fp32", "--out", str(out)])  # one record exists before the workers start
    main(argv + ["--workers", "2"])
    records = json.loads(out.read_text())
    keys = [(r["bits"], r["method"]) for r in records]
    assert sorted(keys) == sorted([("W4A8", "fp32"), ("W4A8", "baseline"), ("W2A8", "baseline"),
                                   ("W4A8", "smoke@fp32"), ("W2A8", "smoke@fp32")])
    assert all(r["precision"] == "fp32" for r in records if r["method"] == "smoke@fp32")
    # the core comparison is scheduled before the variants
    order = [t["method"] for t in tasks(__import__("argparse").Namespace(
        imagenet=None, models=["m"], seeds=[0, 1], placements=["e2e"], bits=["W4A8"],
        methods=["histogram+default", "fast", "default", "baseline"]))]
    assert order == ["default", "baseline", "default", "baseline", "fast", "fast", "histogram+default",
                     "histogram+default"]
    # ... and the seeds in the order given, so a call cut short by its time limit has the seeds named first
    seeds = [t["seed"] for t in tasks(__import__("argparse").Namespace(
        imagenet=None, models=["m"], seeds=[2, 0], placements=["e2e"], bits=["W4A8"], methods=["fast", "default"]))]
    assert seeds == [2, 0, 2, 0]
    # --only keeps just the named model:placement:bits:seed runs of the cross product
    picked = tasks(__import__("argparse").Namespace(
        imagenet=None, models=["m", "n"], seeds=[0, 1], placements=["e2e"], bits=["W4A8", "W3A4"],
        methods=["default", "default-grace0"], only=["m:e2e:W3A4:1", "n:e2e:W4A8:0"]))
    assert sorted((t["model"], t["bits"], t["seed"], t["method"]) for t in picked) == [
        ("m", "W3A4", 1, "default"), ("m", "W3A4", 1, "default-grace0"),
        ("n", "W4A8", 0, "default"), ("n", "W4A8", 0, "default-grace0")]
    with pytest.raises(SystemExit, match="MODEL:PLACEMENT:BITS:SEED"):
        tasks(__import__("argparse").Namespace(imagenet=None, models=["m"], seeds=[0], placements=["e2e"],
                                               bits=["W4A8"], methods=["default"], only=["m:e2e:W4A8"]))


def test_accuracy_benchmark_does_not_record_an_interrupted_search(tmp_path, monkeypatch):
    """SIGINT at a device call's time limit stops a search that keeps its best scales: recording that run as
    finished put shortened searches in accuracy.json (found in session 7)."""
    import cptv_plugin
    from benchmarks.accuracy import main

    real_refine = cptv_plugin.refine

    def interrupted_refine(*args, **kwargs):
        result = real_refine(*args, **kwargs)
        result.interrupted = True
        return result

    monkeypatch.setattr(cptv_plugin, "refine", interrupted_refine)
    out = tmp_path / "accuracy.json"
    argv = ["--models", "fmnist_vit_tiny", "--bits", "W4A8", "--placements", "e2e", "--methods", "baseline",
            "smoke", "--seeds", "0", "--calibration", "100", "--test-images", "100", "--device", "cpu",
            "--out", str(out)]
    with pytest.raises(KeyboardInterrupt, match="not recorded"):
        main(argv)
    assert [r["method"] for r in json.loads(out.read_text())] == ["baseline"]


def test_accuracy_benchmark_simulates_low_bit_fx_activations_with_their_narrowed_range(tmp_path):
    """convert_fx would run "4-bit" activations as quint8 with 0-255: the benchmark measures real 4-bit ones."""
    from benchmarks.accuracy import fx_target, main

    assert fx_target("e2e", "W4A4") == "fake_quant" and fx_target("e2e", "W4A8") == "convert_fx"
    assert fx_target("linear", "W4A4") is None
    out = tmp_path / "accuracy.json"
    main(["--models", "fmnist_vit_tiny", "--bits", "W8A4", "W8A8", "--placements", "e2e", "--methods", "baseline",
          "--seeds", "0", "--calibration", "100", "--test-images", "300", "--device", "cpu", "--out", str(out)])
    records = {r["bits"]: r for r in json.loads(out.read_text())}
    assert records["W8A4"]["activation_range"] == "narrowed" and records["W8A8"]["activation_range"] == "dtype"
    assert records["W8A4"]["top1"] < records["W8A8"]["top1"] - 5  # 16 real levels cost far more than 256


def test_stem_placement_keeps_only_the_stem_activations_at_8_bits(tiny_vit, fmnist):
    """``e2e-stem8``: the activations inside the patch embedding get 256 levels, every other one the 16 of A4."""
    from torch.ao.quantization.observer import ObserverBase

    from benchmarks.accuracy import fx_target, quantize_e2e, stem_modules

    assert fx_target("e2e-stem8", "W4A4") == "fake_quant"
    stem = stem_modules("fmnist_vit_tiny", tiny_vit)
    assert stem == ("patch_embed",)
    with pytest.raises(ValueError, match="no module 'stem'.*STEMS"):
        stem_modules("fmnist_levit", tiny_vit)
    prepared = quantize_e2e(tiny_vit, fmnist[0][:100], "W4A4", "baseline", stem)
    levels = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module" and isinstance(prepared.get_submodule(node.target), ObserverBase):
            observer = prepared.get_submodule(node.target)
            if observer.dtype == torch.quint8:  # an activation
                reads = node.args[0].name if node.args else ""
                levels[reads] = observer.quant_max - observer.quant_min + 1
    # the image and the ops inside the stem (its conv, PatchEmbed's flatten/transpose) at 8 bits; the stem's output
    # (its last module, an Identity norm here) is observed by its consumer's qconfig, A4, like every other activation
    assert {reads for reads, n in levels.items() if n == 256} == {"x", "patch_embed_proj", "flatten", "transpose"}
    assert levels["patch_embed_norm"] == 16 and set(levels.values()) == {16, 256}


@pytest.mark.parametrize("placement", ["e2e-add8", "e2e-mulexact", "e2e-add8-mulexact"])
def test_op_type_placements_widen_or_drop_exactly_those_ops_quantizers(tiny_vit, fmnist, placement):
    """``e2e-add8``: every add's output (the residual stream; the position embedding's add) gets 256 levels;
    ``e2e-mulexact``: no quantizer reads a scaled query (``q * scale`` stays on ``q``'s grid); every other
    activation keeps the 16 levels of A4."""
    import operator

    from torch.ao.quantization.observer import ObserverBase

    from benchmarks.accuracy import EIGHT_BIT_OPS, UNQUANTIZED_OPS, quantize_e2e

    wide_ops, dropped_ops = EIGHT_BIT_OPS.get(placement, ()), UNQUANTIZED_OPS.get(placement, ())
    prepared = quantize_e2e(tiny_vit, fmnist[0][:100], "W4A4", "baseline", wide_ops, dropped_ops)
    kinds = [node.target for node in prepared.graph.nodes]
    assert (kinds.count(operator.add), kinds.count(operator.mul)) == (9, 4)  # pos. embedding + 2 per block; 1 per block
    wide = {node.name for node in prepared.graph.nodes if node.target in wide_ops}
    levels = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module" and isinstance(prepared.get_submodule(node.target), ObserverBase):
            observer = prepared.get_submodule(node.target)
            if observer.dtype == torch.quint8 and node.args[0].op != "get_attr":  # an activation
                levels[node.args[0].name] = observer.quant_max - observer.quant_min + 1
                assert node.args[0].target not in dropped_ops, f"{node.args[0].name} is still quantized"
    assert len(wide) == (9 if wide_ops else 0) and wide <= levels.keys()
    assert all(count == (256 if name in wide else 16) for name, count in levels.items()), levels


def test_accuracy_benchmark_takes_an_imagenet_layout_folder(tmp_path):
    from PIL import Image

    from benchmarks.accuracy import main

    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label in ("n01440764", "n01443537"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for index in range(3):
                pixels = (torch.rand(48, 64, 3, generator=generator) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{index}.JPEG")
    out = tmp_path / "imagenet.json"
    main(["--imagenet", str(tmp_path / "val"), "--imagenet-calibration", str(tmp_path / "train"),
          "--imagenet-model", "timm:vit_tiny_patch16_224", "--imagenet-model-kwargs", '{"num_classes": 2}',
          "--bits", "W8A8", "--methods", "fp32", "baseline", "--placements", "e2e", "--seeds", "0",
          "--calibration", "6", "--device", "cpu", "--out", str(out)])
    records = json.loads(out.read_text())
    assert [r["method"] for r in records] == ["fp32", "baseline"]
    assert all(r["test_images"] == 6 and r["model"] == "timm:vit_tiny_patch16_224" for r in records)


@pytest.mark.parametrize("framework", ["fx", "modelopt"])
def test_speed_benchmark_runs_small_on_the_cpu(tmp_path, framework):
    from benchmarks.speed import main

    if framework == "modelopt":
        pytest.importorskip("modelopt.torch.quantization")
    out = tmp_path / "speed.json"
    main(["--models", "deit_tiny_patch16_224", "--images", "4", "--passes", "1", "--literal-evaluations", "1",
          "--image-size", "64", "--device", "cpu", "--framework", framework, "--out", str(out)]
         + (["--warm"] if framework == "fx" else []))
    records = json.loads(out.read_text())
    fast, literal = records[0], records[-1]
    assert fast["image_size"] == literal["image_size"] == 64
    assert fast["engine"] == "fast" and literal["engine"] == "literal"
    assert fast["framework"] == literal["framework"] == framework
    assert fast["evaluations"] == literal["evaluations"] > 0 and "extrapolated_from" in literal
    assert 0 < fast["search_seconds"] <= fast["seconds"]
    if framework == "fx":  # --warm: the same search timed again, same result
        cold, warm = records[0], records[1]
        assert (cold["inductor_cache"], warm["inductor_cache"], warm["engine"]) == ("cold", "warm", "fast")
        # a second timing of the same search (the two can round to the same 0.01 s on the CPU: seen in session 24)
        assert warm["fitness"] == cold["fitness"] and 0 < warm["search_seconds"] <= warm["seconds"]


def test_hugging_face_cut_benchmark_times_both_engines_to_the_same_scales(tmp_path):
    pytest.importorskip("modelopt.torch.quantization")
    pytest.importorskip("transformers")
    from benchmarks.hugging_face_cut import main

    out = tmp_path / "cut.json"
    out.write_text(json.dumps([{"kept": True}]))  # earlier records stay
    main(["--layers", "2", "--width", "24", "--images", "100", "--out", str(out)])
    kept, cut, whole = json.loads(out.read_text())
    assert kept == {"kept": True} and (cut["engine"], whole["engine"]) == ("cut", "whole")
    assert cut["evaluations"] == whole["evaluations"] > 0 and cut["same_scales"] and whole["same_scales"]
    assert cut["final_fitness"] == whole["final_fitness"] and cut["seconds"] > 0


def test_speed_compile_phases_sum_each_phase_over_graphs_and_leave_out_untimed_ones():
    from benchmarks.speed import _compile_phases

    metrics = {"bytecode_tracing": [0.5, 0.25], "GraphLowering.codegen": [1.0], "async_compile.wait": [],
               "some_other_phase": [9.0]}
    assert _compile_phases(metrics) == {"bytecode_tracing": 0.75, "GraphLowering.codegen": 1.0}


def test_stage_variant_names_parse_into_settings_and_a_typo_is_refused():
    from benchmarks.stage_variants import variant_settings

    assert variant_settings("s600") == (False, {"gradient_steps": 600})
    assert variant_settings("gb200-s400-lr0.005") == (False, {"gradient_batch_size": 200, "gradient_steps": 400,
                                                             "gradient_lr": 0.005})
    assert variant_settings("only-s1000-wu0.1-c5") == (True, {"gradient_steps": 1000, "gradient_warmup": 0.1,
                                                             "gradient_checks": 5})
    assert variant_settings("c50-bt3-g100") == (False, {"gradient_checks": 50, "gradient_backtrack": 3.0,
                                                         "gradient_grace": 100})
    assert variant_settings("s300-clipon_overshoot") == (False, {"gradient_steps": 300,
                                                                 "gradient_clip_weights": "on_overshoot"})
    with pytest.raises(ValueError, match="unknown setting 'x3'"):
        variant_settings("s600-x3")


@pytest.mark.parametrize("preset, grace", [("fast", 100), ("default", 110)])
def test_benchmark_variant_names_keep_the_settings_their_records_ran_with(preset, grace):
    """`fast` took a stage grace in session 36, the default in session 39: their older records are `fast-grace0` /
    `default-grace0`, and the variants measured before then must not silently pick the grace up on a re-run."""
    import dataclasses

    from benchmarks.accuracy import VARIANTS, search_config

    cpu = torch.device("cpu")
    new, old = search_config(preset, 0, cpu), search_config(f"{preset}-grace0", 0, cpu)
    assert new.gradient_grace == grace and old.gradient_grace == 0
    differing = {field.name for field in dataclasses.fields(new)
                 if getattr(new, field.name) != getattr(old, field.name)}
    assert differing == {"gradient_grace", "name"}
    older = {"fast": ("fast-stage300", "fast-stage300-lossless", "fast-weightseed", "fast-lr003", "fast-passes6"),
             "default": [name for name, (base, _) in VARIANTS.items()
                         if base == "default" and name != "default-grace110"]}
    assert len(older[preset]) >= 5
    for name in older[preset]:
        assert search_config(name, 0, cpu).gradient_grace == 0, name
    assert search_config("default-grace110", 0, cpu) == search_config("default", 0, cpu)  # names are not compared


@pytest.mark.parametrize("module", ["profile_attention", "profile_fake_quant", "profile_int8"])
def test_cuda_only_diagnostics_refuse_a_machine_without_cuda_by_name(module, monkeypatch, capsys):
    import importlib

    main = importlib.import_module(f"benchmarks.{module}").main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "run it on a machine with a CUDA GPU" in capsys.readouterr().err


def test_int8_diagnostic_multiplies_the_integers_the_simulated_layer_fake_quantizes():
    """The int8 variant of benchmarks/profile_int8.py computes the simulated W4A8 Linear's product (exact integer
    sums, then one rescale), so its timings compare like with like; torch._int_mm runs on the CPU too."""
    from benchmarks.profile_int8 import QuantizedLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    simulated, integer = QuantizedLinear(linear, int8=False), QuantizedLinear(linear, int8=True)
    inputs = torch.randn(3, 40, 64)
    with torch.no_grad():
        for layer in (simulated, integer):
            layer(inputs[:1])  # MinMax calibration on the first image: the others' outliers clip
            layer.calibrating = False
        expected, got = simulated(inputs), integer(inputs)
    assert got.shape == expected.shape == (3, 40, 48)
    assert torch.allclose(got, expected, atol=1e-5)
    # the quantization is real: far from the unquantized layer
    assert (expected - linear(inputs)).abs().max() > 0.05


def test_accuracy_report_puts_variants_in_their_own_table_beside_the_reference_methods(tmp_path):
    from benchmarks.accuracy import report

    def record(method, bits, top1, seed=0):
        return {"model": "m", "placement": "e2e", "bits": bits, "method": method, "seed": seed, "top1": top1,
                "seconds": 1.0, "evaluations": 1, "calibration_images": 100, "test_images": 100}

    matrix_only = [record("fp32", "W8A8", 90.0), record("baseline", "W4A4", 50.0), record("default", "W4A4", 80.0),
                   record("paper", "W4A4", 51.0)]
    text = report(matrix_only, tmp_path, "matrix")
    assert "## Variants" not in text and "| m | e2e | W4A4 |  | 50.00 | 80.00 | 51.00 |" in text
    with_variants = matrix_only + [record("default-f2c-full", "W2A8", 70.0), record("default-f2c-full", "W2A8", 72.0,
                                                                                   seed=1)]
    text = report(with_variants, tmp_path, "both")
    matrix, variants = text.split("## Variants")
    assert "default-f2c-full" not in matrix and "| m | e2e | W4A4 |  | 50.00 | 80.00 | 51.00 |" in matrix
    header = next(line for line in variants.splitlines() if line.startswith("| model"))
    assert header == "| model | placement | bits | fp32 | baseline | default | default-f2c-full |"
    assert "| m | e2e | W2A8 |  |  |  | 71.00 ± 1.41 (n=2) |" in variants
    assert "W4A4" not in variants  # rows without a variant stay in the first table only
    assert "| m | e2e | W2A8 |" not in matrix  # ... and rows with no matrix method stay out of the first
    assert (tmp_path / "both.md").read_text().count("## Variants") == 1


def test_slim_fashion_mnist_keeps_the_seeds_calibration_images_and_refuses_its_source(fmnist, tmp_path):
    from benchmarks.slim_fashion_mnist import main
    from cptv_plugin.datasets import FASHION_MNIST_DIR, calibration_subset, load_fashion_mnist

    main([str(tmp_path / "slim"), "--seeds", "1"])
    full, slim = load_fashion_mnist("train"), load_fashion_mnist("train", root=tmp_path / "slim")
    assert torch.equal(full[1], slim[1]) and not torch.equal(full[0], slim[0])  # other images zeroed
    assert torch.equal(calibration_subset(full[0], 1000, 1), calibration_subset(slim[0], 1000, 1))
    assert not torch.equal(calibration_subset(full[0], 1000, 2), calibration_subset(slim[0], 1000, 2))
    assert torch.equal(load_fashion_mnist("test")[0], load_fashion_mnist("test", root=tmp_path / "slim")[0])
    with pytest.raises(SystemExit, match="source folder"):
        main([str(FASHION_MNIST_DIR)])


def test_goals_report_names_each_goal_a_row_misses_and_counts_only_paired_seeds():
    from benchmarks.accuracy import goals_report

    def record(method, bits, top1, seed=0, model="fmnist_deit_tiny", placement="linear"):
        return {"model": model, "placement": placement, "bits": bits, "method": method, "seed": seed, "top1": top1,
                "seconds": 10.0 if method == "default" else 1.0}

    records = [record("fp32", "W8A8", 89.0), record("fp32", "W8A8", 90.0, model="m", placement="e2e")]
    for seed in (0, 1):
        records += [record("baseline", "W4A4", 84.0, seed), record("default", "W4A4", 85.0 + seed, seed),
                    record("paper", "W4A4", 85.5, seed), record("modelopt-mse", "W4A4", 84.5, seed),
                    record("baseline", "W8A8", 88.9, seed), record("default", "W8A8", 88.8 + 0.2 * seed, seed),
                    record("baseline", "W2A8", 50.0, seed, "m", "e2e"),
                    record("default", "W2A8", 75.0, seed, "m", "e2e"),
                    record("histogram", "W2A8", 80.0, seed, "m", "e2e")]
    records += [record("modelopt-mse+default", "W4A4", 84.0), record("histogram+default", "W2A8", 85.0, 1, "m", "e2e"),
                record("paper", "W2A8", 74.0, 0, "m", "e2e")]
    text = goals_report(records)
    # DeiT-like linear W4A4: mean 85.5 against the absolute goal 86; the paper wins seed 0, loses seed 1
    assert "| fmnist_deit_tiny | linear | W4A4 | 84.00 | 85.50 (n=2) | 89.00 | ≥ 86 | **no** |" in text
    assert "- fmnist_deit_tiny linear W4A4: ≥ 86" in text
    assert "- fmnist_deit_tiny linear W4A4: default > paper at 1 / 2 seeds" in text
    # 10 s for 1.5 points against 1 s for 1.5 points
    assert "- fmnist_deit_tiny linear W4A4: default dearer per point than paper, 6.67 / 0.67 s" in text
    assert ("- fmnist_deit_tiny linear W4A4: default dearer per point than paper at 2 / 2 seeds (s per point, "
            "default / paper: seed 0 10 / 0.67, seed 1 5.00 / 0.67)") in text
    # the stacked run at seed 0 only is compared with its start at seed 0 (84.0 vs 84.5): no improvement
    assert "modelopt-mse: -0.50 (n=1)" in text and "modelopt-mse+default does not improve modelopt-mse" in text
    # another model's e2e W2A8: half of the 40-point gap closed (62 %), but the histogram calibration is better
    assert "| m | e2e | W2A8 | 50.00 | 75.00 (n=2) | 90.00 | half the gap (closed 62 %) | yes |" in text
    assert "- m e2e W2A8: histogram 80.00 ≥ default 75.00" in text
    assert "histogram: +5.00 (n=1)" in text and "| 1 / 1 |" in text  # paper recorded at seed 0 only
    # 8-bit activations: below the baseline at seed 0 only
    assert "| fmnist_deit_tiny | linear | W8A8 | 88.90 | 88.90 (n=2) | 1 / 2 |  |" in text
    assert ("- fmnist_deit_tiny linear W8A8: default below the baseline at 1 / 2 seeds (not tested image by image: "
            "a run has no per-image verdicts)") in text
    assert "(timed alone)" not in text
    for r in records:
        r["timed_alone"] = r["placement"] == "linear"
    assert "- fmnist_deit_tiny linear W4A4: default dearer per point than paper, 6.67 / 0.67 s (timed alone)" in \
        goals_report(records)
    assert goals_report([record("baseline", "W4A4", 84.0)]) == ""
    # where both runs of a missed seed carry their per-image verdicts, the miss is tested image by image
    for r in records:
        if r["bits"] == "W8A8" and r["seed"] == 0 and r["method"] in ("baseline", "default"):
            right = torch.arange(10) < (9 if r["method"] == "baseline" else 6)  # 10 test images, the first ones right
            r.update(test_images=10, correct=base64.b64encode(np.packbits(right.numpy()).tobytes()).decode())
    assert ("- fmnist_deit_tiny linear W8A8: default below the baseline at 1 / 2 seeds (test images only the default / "
            "only the baseline got right, exact McNemar p: 0-3 p=0.25)") in goals_report(records)


def test_a_miss_without_per_image_verdicts_gets_the_smallest_p_its_top1_gap_allows():
    from benchmarks.accuracy import _sign_test, goals_report, images_behind, smallest_mcnemar_p

    # the bound: of all the ways two runs can be `gap` images apart, every differing image on one side is the least
    # likely by chance; more differing images, one for each side, only raise p
    for gap in range(8):
        assert smallest_mcnemar_p(gap) == min(1.0, 2.0 ** (1 - gap))
        assert all(_sign_test(gap + both, both) >= smallest_mcnemar_p(gap) for both in range(150))

    def record(method, seed, right, verdicts=None):
        r = {"model": "m", "placement": "linear", "bits": "W4A8", "method": method, "seed": seed,
             "top1": 100.0 * right / 10000, "seconds": 1.0, "test_images": 10000}
        if verdicts is not None:
            r["correct"] = base64.b64encode(np.packbits(verdicts.numpy()).tobytes()).decode()
        return r

    records = [record("baseline", s, 9050, None) for s in (0, 1, 2)]
    records += [record("default", 0, 9072), record("paper", 0, 9062),
                record("default", 1, 9063), record("paper", 1, 9065),
                record("default", 2, 9060), record("paper", 2, 9070)]
    assert images_behind(records[5], records[6]) == 2 and images_behind(records[6], records[5]) == -2
    assert images_behind(records[5], {**records[6], "test_images": 1000}) is None
    assert ("- m linear W4A8: default > paper at 1 / 3 seeds (not every run has per-image verdicts; exact McNemar: "
            "seed 1 2 test images behind, p ≥ 0.50 whichever images differ; seed 2 10 test images behind, "
            "p ≥ 2.0e-03 whichever images differ)") in goals_report(records)
    # a missed seed with verdicts is tested image by image beside the one without
    right = torch.arange(10000) < 9063
    records[5]["correct"] = record("x", 1, 0, right)["correct"]
    records[6]["correct"] = record("x", 1, 0, right.roll(5) | (torch.arange(10000) < 2))["correct"]
    assert "exact McNemar: seed 1 3-5 p=0.73; seed 2 10 test images behind" in goals_report(records)
    for r in records:  # older records: no test count (nor verdicts), no bound
        r.pop("test_images"), r.pop("correct", None)
    assert "(not tested image by image: a run has no per-image verdicts)" in goals_report(records)


def test_goals_report_checks_the_cost_per_point_at_every_seed_not_only_on_average():
    from benchmarks.accuracy import goals_report

    def record(method, top1, seed, seconds):
        return {"model": "m", "placement": "linear", "bits": "W8A8", "method": method, "seed": seed, "top1": top1,
                "seconds": seconds}

    # seed 0: the default gains 2 points in 10 s (5 s a point), the paper 1 point in 1 s; seed 1: 10 points in 10 s
    # against 0.1 in 1 s. On average the default is cheaper per point (10 s / 6 points against 1 s / 0.55 points)
    records = [record("baseline", 80.0, 0, 1.0), record("default", 82.0, 0, 10.0), record("paper", 81.0, 0, 1.0),
               record("baseline", 80.0, 1, 1.0), record("default", 90.0, 1, 10.0), record("paper", 80.1, 1, 1.0)]
    text = goals_report(records)
    assert "| m | linear | W8A8 | 80.00 | 86.00 (n=2) | 0 / 2 | 2 / 2 | 1.67 / 1.82 |" in text
    short = text.split("### Short of a goal")[1]
    assert short.strip().splitlines() == [
        "- m linear W8A8: default dearer per point than paper at 1 / 2 seeds (s per point, default / paper: "
        "seed 0 5.00 / 1.00)"]
    for r in records:  # records that name their test count show what each side bought, in images
        r["test_images"] = 10000
    assert "(s per point, default / paper: seed 0 5.00 / 1.00 (gains 200 / 100 test images))" in goals_report(records)
    records[2]["top1"] = 80.0  # the paper gains nothing at seed 0: no cost of its own to compare with
    assert "- none" in goals_report(records)


def test_goals_flag_prints_the_goals_and_writes_nothing(tmp_path, capsys):
    from benchmarks.accuracy import main, save_records

    def record(method, top1, seed):
        return {"model": "m", "placement": "e2e", "bits": "W2A8", "method": method, "seed": seed, "top1": top1,
                "seconds": 1.0, "calibration_images": 100, "test_images": 100}

    out = tmp_path / "records.json"
    save_records(out, [record("fp32", 90.0, 0), record("baseline", 50.0, 0), record("default", 60.0, 0)])
    main(["--goals", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| m | e2e | W2A8 | 50.00 | 60.00 (n=1) | 90.00 | half the gap (closed 25 %) | **no** |" in printed
    assert "- m e2e W2A8: half the gap (closed 25 %)" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records.json"]


def test_pooled_test_counts_an_image_once_however_many_seeds_it_flips_at():
    from benchmarks.accuracy import goals_report, pooled_report, pooled_test

    def record(method, seed, right):
        verdicts = torch.tensor(right)
        return {"model": "m", "placement": "e2e", "bits": "W8A8", "method": method, "seed": seed,
                "top1": verdicts.float().mean().item() * 100, "seconds": 1.0, "test_images": len(right),
                "correct": base64.b64encode(np.packbits(verdicts.numpy()).tobytes()).decode()}

    # 10 test images; at every seed the baseline alone gets images 0-3 right, the default alone image 4 + seed
    records, pairs = [], []
    for seed in range(3):
        baseline = record("baseline", seed, [True] * 4 + [False] * 6)
        default = record("default", seed, [False] * 4 + [i == 4 + seed for i in range(4, 10)])
        records += [baseline, default]
        pairs.append((default, baseline))
    # summed over the seeds, 3 against 12 (p = 0.035); image by image, 3 images against the same 4 at every seed
    assert pooled_test(pairs) == {"images_first": 3, "images_second": 4, "runs": 3, "p": 1.0}
    assert pooled_test([(pairs[0][1], pairs[0][1])])["p"] == 1.0
    with pytest.raises(ValueError, match="same test images"):
        pooled_test([pairs[0], (dict(pairs[1][0], test_images=8), pairs[1][1])])
    assert ("- m e2e W8A8: default below the baseline at 3 / 3 seeds (test images only the default / only the "
            "baseline got right, exact McNemar p: 1-4 p=0.38, 1-4 p=0.38, 1-4 p=0.38; over all 3 seeds, images right "
            "at more seeds with the default / the baseline: 3-4 p=1.00)") in goals_report(records)
    # the table of every row: no paper records here, and a single seed is not pooled
    assert "| m | e2e | W8A8 | 3-4 (1; 3 seeds) |  |" in pooled_report(records)
    assert pooled_report(records[:2]) == ""
    # a fourth seed, not below the baseline, without per-image verdicts: the misses are still tested seed by seed,
    # but there is no pooled test (it would leave that seed out)
    records += [dict(record("baseline", 3, [True] * 10), correct=None), dict(record("default", 3, [True] * 10),
                                                                             correct=None)]
    text = goals_report(records)
    assert "default below the baseline at 3 / 4 seeds" in text and "1-4 p=0.38, 1-4 p=0.38, 1-4 p=0.38)" in text
    assert "over all" not in text
