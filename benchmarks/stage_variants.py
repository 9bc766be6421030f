"""Gradient-stage variants from one search: per model, placement, bits and seed, the baseline, the paper preset and
the default's search (``gradient_steps=0``; ``--search fast``: fast's) run once; each variant's stage then starts
from a copy of the searched model (``SearchConfig(passes=0)``: no search, no starts, the stage only). Every run
alone in this process, so the seconds are comparable: ``seconds`` is wall time of the ``refine`` calls (a
variant's: the search's plus its own), ``result_seconds`` what ``RefineResult.seconds`` says (the accuracy
benchmark's seconds; in ``stage_variants_h200.json``, recorded before it counted the whole refinement, the lossless
check, the search and the stage only), ``stage_seconds`` the stage's own. Seconds per point gained = seconds /
(top-1 − baseline).

Variants are names of dash-joined settings: ``s600`` (``gradient_steps``), ``gb200`` (``gradient_batch_size``),
``lr0.005`` (``gradient_lr``), ``wu0.1`` (``gradient_warmup``), ``c5`` (``gradient_checks``), ``bt3``
(``gradient_backtrack``), ``g100`` (``gradient_grace``), ``clipbefore`` or ``clipon_overshoot``
(``gradient_clip_weights``); ``s1000`` is the default's stage. With ``--search fast``, ``s300`` is fast's stage
(``gradient_grace=100`` since session 36) and ``s300-g0`` the stage it ran before. ``only-s1000``: the stage from the
baseline with the default's starts and no search.

The search of an FX model is committed without clipping its low-bit weights (``clamp_weights=False``), so that a
variant's stage sees the weights a single ``refine`` call's stage sees; before session 31 it clipped them at the
searched scales, and every variant measured then ran as with ``gradient_clip_weights="before"``
(benchmarks/FINDINGS.md, section 39).

    python -m benchmarks.stage_variants --models fmnist_swin_tiny --placements e2e --bits W2A8 --seeds 0 1 2 \\
        --variants s1000 s600 gb200-s500 --out benchmarks/results/experiments/stage_variants_h200.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from benchmarks.accuracy import (data_for, evaluation_model, fx_target, load_records, outcome_on_test_set,
                                 quantize_e2e, quantize_linear, save_records, search_config)

SETTINGS = {"s": ("gradient_steps", int), "gb": ("gradient_batch_size", int), "lr": ("gradient_lr", float),
            "wu": ("gradient_warmup", float), "c": ("gradient_checks", int), "bt": ("gradient_backtrack", float),
            "g": ("gradient_grace", int), "clip": ("gradient_clip_weights", str)}


def variant_settings(name: str) -> tuple[bool, dict]:
    """``(from_baseline, overrides)`` of a variant name such as ``gb200-s500`` or ``only-s1000``."""
    overrides, from_baseline = {}, False
    for token in name.split("-"):
        if token == "only":
            from_baseline = True
            continue
        prefix = next((p for p in sorted(SETTINGS, key=len, reverse=True) if token.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"unknown setting {token!r} in variant {name!r}; known prefixes: {sorted(SETTINGS)}")
        attribute, kind = SETTINGS[prefix]
        overrides[attribute] = kind(token[len(prefix):])
    return from_baseline, overrides


def measure(quantized, placement: str, bits: str, test_x, test_y, fp32_logits) -> dict:
    from cptv_plugin.train import predict_logits

    outcome = outcome_on_test_set(predict_logits(evaluation_model(quantized, placement, bits), test_x), test_y,
                                  fp32_logits)
    return {k: v for k, v in outcome.items() if k != "correct"}


def refine(quantized, calib, placement: str, bits: str, config, fp_model, clip: bool = True) -> tuple[dict, float]:
    """``cptv_plugin.refine`` against ``fp_model`` (a refined FX model's weights are clipped onto their grid: with
    quantization off it is not the float model any more) and its wall time; ``clip=False``: an FX model's commit
    leaves the weights as they are."""
    import cptv_plugin

    target = fx_target(placement, bits)
    options = {"target": target, "clamp_weights": clip} if target is not None else {}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.time()
    result = cptv_plugin.refine(quantized, calib, config=config, fp_model=fp_model, **options)
    seconds = time.time() - start
    return result, seconds


def run_seed(args, model_name: str, model, placement: str, bits: str, seed: int, device) -> None:
    from cptv_plugin.train import predict_logits

    calib, test_x, test_y = data_for(args, model_name, model, seed, device)
    fp32_logits = predict_logits(model, test_x)
    quantize = {"e2e": quantize_e2e, "linear": quantize_linear}[placement]
    common = {"model": model_name, "placement": placement, "bits": bits, "seed": seed,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__.split("+")[0]}
    out = Path(args.out)

    def record(method: str, quantized, seconds: float, result=None, **extra) -> None:
        entry = {**common, "method": method, "seconds": round(seconds, 2),
                 **measure(quantized, placement, bits, test_x, test_y, fp32_logits), **extra}
        if result is not None:  # RefineResult.seconds: what the accuracy benchmark records as a run's seconds
            entry["evaluations"], entry["result_seconds"] = result.evaluations, round(result.seconds, 2)
            if result.gradient is not None:
                entry["gradient"] = result.gradient
        save_records(out, load_records(out) + [entry])  # each run as it ends: a timed-out call keeps the rest
        print(json.dumps({k: v for k, v in entry.items() if k not in ("gradient",)}), flush=True)

    torch.manual_seed(seed)
    baseline = quantize(model, calib, bits, "baseline")
    if args.warmup and seed == args.seeds[0]:  # compiles the segments the searches run, so no run below waits
        refine(copy.deepcopy(baseline), calib, placement, bits,
               search_config(args.search, seed, device).replace(passes=1, gradient_steps=0), model)
    record("baseline", baseline, 0.0)
    if args.paper:
        paper = copy.deepcopy(baseline)
        result, seconds = refine(paper, calib, placement, bits, search_config("paper", seed, device), model)
        record("paper", paper, seconds, result)
    searched = copy.deepcopy(baseline)
    # committed unclipped: the variants' stages see the weights that the stage of one refine call sees
    result, search_seconds = refine(searched, calib, placement, bits,
                                    search_config(args.search, seed, device).replace(gradient_steps=0), model,
                                    clip=False)
    record("search", searched, search_seconds, result)
    for name in args.variants:
        from_baseline, overrides = variant_settings(name)
        config = search_config(args.search, seed, device).replace(passes=0, **overrides)
        if not from_baseline:
            config = config.replace(start_candidates=(), seed_candidates=(), lossless_kl=0.0)
        quantized = copy.deepcopy(baseline if from_baseline else searched)
        result, seconds = refine(quantized, calib, placement, bits, config, model)
        stage = (result.gradient or {}).get("seconds", 0.0)
        total = seconds if from_baseline else search_seconds + seconds
        record(name, quantized, total, result, stage_seconds=stage, refine_seconds=round(seconds, 2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["fmnist_swin_tiny"])
    parser.add_argument("--placements", nargs="+", default=["e2e"], choices=["e2e", "linear"])
    parser.add_argument("--bits", nargs="+", default=["W2A8"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--variants", nargs="+", default=["s1000"])
    parser.add_argument("--calibration", type=int, default=1000)
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the unrecorded one-pass search that fills inductor's caches first")
    parser.add_argument("--search", default="default",
                        help="the preset whose search runs once and whose stage settings the variants change")
    parser.add_argument("--no-paper", dest="paper", action="store_false", help="skip the paper preset's run")
    parser.add_argument("--out", required=True, help="append the records to this JSON file (written atomically)")
    args = parser.parse_args(argv)
    args.imagenet = None
    for name in args.variants:  # a typo fails before any run
        variant_settings(name)
    from cptv_plugin.models import load_reference_model

    device = torch.device(args.device)
    for model_name in args.models:
        model = load_reference_model(model_name).eval().to(device)
        for placement in args.placements:
            for bits in args.bits:
                for seed in args.seeds:
                    run_seed(args, model_name, model, placement, bits, seed, device)


if __name__ == "__main__":
    main()
