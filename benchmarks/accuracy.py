"""Reference accuracy benchmark: Fashion-MNIST models at six bit widths, every method, several seeds.

    python -m benchmarks.accuracy                                   # everything (GPU: a few sessions' work)
    python -m benchmarks.accuracy --models fmnist_vit_tiny --bits W4A8 --methods baseline fast --seeds 0 \\
        --device cpu                                                # the CPU path: one model, one setting
    python -m benchmarks.accuracy --imagenet /data/imagenet/val --imagenet-model timm:deit_tiny_patch16_224 \\
        --imagenet-calibration /data/imagenet/train --bits W4A8 --methods baseline default

Records go to ``benchmarks/results/accuracy.json`` (one per model, bit setting, placement, method and seed:
``model, bits, placement, framework, method, seed, top1, seconds, evaluations, device, fitness, history``; since
session 13 also ``correct``, the per-image verdicts, and ``fp32_fidelity``, the distance from the FP32 model; since
session 18 ``seconds`` is ``RefineResult.seconds`` as it now counts, the whole refinement, and ``refine_seconds`` the
wall time of the ``refine`` call; before, ``seconds`` left out the reference outputs and the start candidates);
runs already recorded are skipped, so the benchmark can be continued across sessions. ``--report`` writes
``accuracy.md`` (mean ± std over seeds; for runs that recorded which test images they got right, paired tests and
the distance from the full-precision model) and ``accuracy.png`` / ``fitness.png``.

Placements of activation quantizers:
* ``e2e``: torch.ao FX's global qconfig (every op: Linear inputs, LayerNorm, GELU, attention matmuls and softmax,
  residual adds); MinMax per-channel weights, per-tensor activations. Evaluated as the simulated quantized model
  (equal to ``convert_to_reference_fx``'s output).
* ``linear``: NVIDIA ModelOpt's default placement (inputs and weights of Linear/Conv only), ``mtq.quantize``.
* ``e2e-stem8``: ``e2e`` with the stem (LeViT's conv stem, the patch embedding of the others) at 8-bit activations:
  mixed precision, a per-module qconfig (``QConfigMapping.set_module_name``).
* ``e2e-add8``: ``e2e`` with every add (the residual stream) at 8-bit activations (``set_object_type``).
* ``e2e-mulexact``: ``e2e`` without the scaled queries' second rounding: every multiplication (in these models only
  ``q * scale``, LeViT's ``(q @ k) * scale``) gets qconfig None, so ``q * scale`` stays on ``q``'s grid, as the
  quantized multiply by a scalar that ``convert_fx`` lowers it to computes it (torch.ao otherwise quantizes the
  product again with ``q``'s own observer); ``e2e-add8-mulexact`` / ``e2e-stem8-mulexact``: that and the adds / the
  stem at 8-bit activations.
* ``pt2e``: torchao PT2E with the XNNPACK quantizer (symmetric per-channel weights, 8-bit activations of the ops
  XNNPACK quantizes), ``torch.export`` → ``prepare_pt2e``; evaluated as the simulation, equal to ``convert_pt2e``.

Methods: ``fp32``; ``baseline`` (MinMax/Max calibration); our presets ``default``, ``paper``, ``fast``;
``paper-mse`` (the paper's search with the MSE fitness, its Fig. 3); what users pick instead: ``histogram``
(torch.ao HistogramObserver, e2e), ``modelopt-mse``, ``modelopt-local_hessian`` and ``modelopt-gptq`` (linear: GPTQ
updates the weights of every Linear with ModelOpt's Hessian-based rounding compensation); and our refinement
on top of each (``histogram+default``, ``modelopt-mse+default``, ...).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import operator
import os
import signal
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

MODELS = ["fmnist_deit_tiny", "fmnist_swin_tiny", "fmnist_levit"]
BITS = ["W8A8", "W4A8", "W3A8", "W4A4", "W3A4", "W2A8"]
STARTS = {"e2e": ["baseline", "histogram"], "linear": ["baseline", "modelopt-mse", "modelopt-local_hessian",
                                                     "modelopt-gptq"],
          "pt2e": ["baseline"]}
# ``e2e-stem8``: the e2e placement with the model's stem (LeViT's conv stem, a ViT's or Swin's patch embedding) at
# 8-bit activations and the weights' bits, the rest as ``--bits`` says: the mixed precision the README advises for
# 4-bit activations (FINDINGS section 35)
STEMS = {"fmnist_levit": ("stem",)}
DEFAULT_STEM = ("patch_embed",)
STARTS["e2e-stem8"] = ["baseline"]
# ``e2e-add8``: the e2e placement with the residual adds (every ``+``: residual stream, position embedding) at 8-bit
# activations: at e2e W4A4 the DeiT-like model's adds cost the most of any op kind (FINDINGS section 36)
RESIDUAL_ADDS = (operator.add, torch.add)
STARTS["e2e-add8"] = ["baseline"]
# ``e2e-mulexact``: the scaled queries (every ``*`` in these models) not rounded a second time. torch.ao quantizes
# ``q * scale`` with ``q``'s own observer (a multiply by a scalar shares its input's), i.e. on a grid ``1 / scale``
# times coarser than the product's range: at 4-bit activations 2-4 levels, the 45 points the DeiT-like model loses
# to its 12 ``mul`` quantizers alone at e2e W4A4 MinMax (FINDINGS sections 36-37)
SCALED_QUERIES = (operator.mul, torch.mul)
STARTS["e2e-mulexact"] = STARTS["e2e-add8-mulexact"] = STARTS["e2e-stem8-mulexact"] = ["baseline"]
# op types each placement keeps at 8-bit activations, and op types it leaves unquantized (``e2e-stem8`` names
# modules: ``stem_modules``)
EIGHT_BIT_OPS = {"e2e-add8": RESIDUAL_ADDS, "e2e-add8-mulexact": RESIDUAL_ADDS}
UNQUANTIZED_OPS = {"e2e-mulexact": SCALED_QUERIES, "e2e-add8-mulexact": SCALED_QUERIES,
                   "e2e-stem8-mulexact": SCALED_QUERIES}
# ablations of a preset: name -> (preset, overrides); recorded like presets, run only when asked for
# the gradient stage (session 10; FINDINGS section 14) is off in every variant measured before it
_NO_GRADIENT = {"gradient_steps": 0}
VARIANTS = {"paper-mse": ("paper", {"fitness": "mse"}),
            # the default before the gradient stage became part of it (session 10)
            "default-nograd": ("default", _NO_GRADIENT),
            # the gradient stage of session 10: one check, at its end (its linear records ran it eagerly)
            "default-lastcheck": ("default", {"gradient_checks": 1}),
            # the presets before the activation start became part of them (session 9; FINDINGS section 13)
            "default-nostart": ("default", {"start_candidates": (), **_NO_GRADIENT}),
            "fast-nostart": ("fast", {"start_candidates": ()}),
            # ablations measured before session 9: each ran without the activation start
            "default-unseeded": ("default", {"seed_candidates": (), "start_candidates": (), **_NO_GRADIENT}),
            "fast-seeded": ("fast", {"seed_candidates": ("weight_mse",), "start_candidates": ()}),
            "default-adaptive": ("default", {"step_adaptation": "one_fifth", "start_candidates": (), **_NO_GRADIENT}),
            "fast-adaptive": ("fast", {"step_adaptation": "one_fifth", "start_candidates": ()}),
            "fast-kl": ("fast", {"fitness": "kl", "start_candidates": ()}),
            "default-guarded": ("default", {"agreement_guard": True, "start_candidates": (), **_NO_GRADIENT}),
            "default-fine": ("default", {"mutation": 0.02, "start_candidates": (), **_NO_GRADIENT}),
            "default-f2c": ("default", {"granularity": "fine_to_coarse", "start_candidates": (), **_NO_GRADIENT}),
            # PTQ4ViT's Hessian-guided metric (label-free, at the logits) as the search's fitness (session 23):
            # against `paper`, `default-nograd` and `fast-nostage`, which differ only in the fitness
            "paper-hessian": ("paper", {"fitness": "hessian"}),
            "default-hessian": ("default", {"fitness": "hessian", **_NO_GRADIENT}),
            "fast-hessian": ("fast", {"fitness": "hessian"}),
            # the "larger batches of negatives" and "temperature of InfoNCE", each alone (session 23;
            # the default's τ = 0.1 and batches of 100 were measured only as part of section 1's bundle)
            "fast-batch500": ("fast", {"batch_size": 500}),
            "fast-tau1": ("fast", {"temperature": 1.0}),
            # the "fitness on features before the head as well as logits" (session 24): an InfoNCE on the
            # last block's output tokens added, with the logits' weight; against `fast-nostage` / `default-nograd`
            "fast-features": ("fast", {"feature_weight": 1.0}),
            "default-features": ("default", {"feature_weight": 1.0, **_NO_GRADIENT}),
            # the CMA-ES (session 24): separable CMA-ES per group visit, the tournament's evaluations
            "fast-cma": ("fast", {"strategy": "cma"}),
            "default-cma": ("default", {"strategy": "cma", **_NO_GRADIENT}),
            # ... re-centred on the best scales found at every visit (plain CMA lost 4-9 points at LeViT-like
            # linear W2A8, its recombined mean trailing the best member)
            "fast-cma-elitist": ("fast", {"strategy": "cma_elitist"}),
            # the issue's held-out guard deciding between the passes' results (session 24), and the end-only guard
            # on the same 800 searched images (what the per-pass choice adds)
            "fast-heldout": ("fast", {"validation_fraction": 0.2}),
            "fast-heldout-perpass": ("fast", {"validation_fraction": 0.2, "validation_selection": "per_pass"}),
            "default-cma-elitist": ("default", {"strategy": "cma_elitist", **_NO_GRADIENT}),
            # ... the same pair with the default's 10 passes on the reference models (session 25; the search alone)
            "default-heldout-end": ("default", {"validation_fraction": 0.2, **_NO_GRADIENT}),
            "default-heldout-perpass": ("default", {"validation_fraction": 0.2, "validation_selection": "per_pass",
                                                    **_NO_GRADIENT}),
            "default-heldout": ("default", {"validation_fraction": 0.2, "start_candidates": (), **_NO_GRADIENT}),
            "default-unseeded-guarded": ("default", {"seed_candidates": (), "agreement_guard": True,
                                                     "start_candidates": (), **_NO_GRADIENT}),
            # the gradient stage alone, from the given scales (no search: one pass of one member per group)
            "gradient-only": ("default", {"passes": 1, "population": 1, "cycles": 0, "samples": 1,
                                          "seed_candidates": (), "start_candidates": ()}),
            # the default before the lossless check (session 12; FINDINGS section 16)
            "default-nolossless": ("default", {})}
# every variant of the default and of fast ran before the lossless check: it always refined; the fast variants
# also ran before fast had a gradient stage (session 20)
_FROZEN = {"default": {"lossless_kl": 0.0}, "fast": {"lossless_kl": 0.0, **_NO_GRADIENT}}
VARIANTS = {name: (preset, {**_FROZEN.get(preset, {}), **overrides}) for name, (preset, overrides) in VARIANTS.items()}
# fast as it was until session 20: no gradient stage, no lossless check. Every `fast` record in results/experiments
# before session 20 is this preset; accuracy.json's were renamed to it
VARIANTS["fast-nostage"] = ("fast", dict(_FROZEN["fast"]))
# a smoke test of the benchmark's own plumbing (the test suite, a first run on a new machine), not a measurement:
# fast-nostage with one pass and no activation start (a grid search per quantizer, most of a small CPU run's time)
VARIANTS["smoke"] = ("fast", {**_FROZEN["fast"], "passes": 1, "start_candidates": ()})
# the gradient stage's step replayed as a CUDA graph instead of compiled (session 14: measured under this name, then
# made the default) and the default's compiled stage before it (every `default` record of sessions 10-13)
VARIANTS["default-graph"] = ("default", {"gradient_cuda_graph": True})
VARIANTS["default-compiled-stage"] = ("default", {"gradient_cuda_graph": False})
# candidates from the recorded stage histories (FINDINGS section 18): 300 steps reach 97 % of the stage's KL gain at
# W2A8 (median), and a third of the rate for the LeViT-like model, whose first check overshot in 17 of 36 runs
VARIANTS["default-300"] = ("default", {"gradient_steps": 300})
VARIANTS["default-lr003"] = ("default", {"gradient_lr": 0.003})
# the quick preset with a short stage: most of the stage's W2A8 gain at a fraction of the default's cost?
VARIANTS["fast-stage300"] = ("fast", {"gradient_steps": 300, "lossless_kl": 0.0})
# ... and with the default's lossless check (a model already within KL 1e-3 of FP32 is left alone): measured at
# every row in session 19, it became `fast` in session 20 (the two names run the same settings)
VARIANTS["fast-stage300-lossless"] = ("fast", {"gradient_steps": 300, "lossless_kl": 1e-3})
# the current fast with the default's weight seed in its first population: does it lift fast where its stage barely
# moves the search's result (LeViT-like e2e A4, FINDINGS section 22)? (`fast-seeded` is the older, stage-less one)
VARIANTS["fast-weightseed"] = ("fast", {"seed_candidates": ("weight_mse",)})
# ... or with a third of the stage's rate (its first check overshoots there and each later check divides the rate by 10)
VARIANTS["fast-lr003"] = ("fast", {"gradient_lr": 0.003})
# ... or with twice its passes (the default's 10 passes reach 68 % there before its stage)
VARIANTS["fast-passes6"] = ("fast", {"passes": 6})
# a linear warm-up of the stage's rate over its first tenth: do fewer first checks overshoot (Swin- and LeViT-like
# W2A8, FINDINGS section 19)?
VARIANTS["default-warmup"] = ("default", {"gradient_warmup": 0.1})
VARIANTS["default-300-warmup"] = ("default", {"gradient_steps": 300, "gradient_warmup": 0.1})
# the stage's steps on all 1,000 calibration images at once (ten fitness batches in one forward pass)
VARIANTS["default-gb1000"] = ("default", {"gradient_batch_size": 1000})
VARIANTS["default-gb1000-300"] = ("default", {"gradient_batch_size": 1000, "gradient_steps": 300})
VARIANTS["default-gb1000-100"] = ("default", {"gradient_batch_size": 1000, "gradient_steps": 100})
# PFCR's fine-to-coarse schedule in the current default (start, seed, lossless check and gradient stage kept): does the
# schedule that `default-f2c` measured on the search alone pay where the default still leaves a gap (e2e A4)?
VARIANTS["default-f2c-full"] = ("default", {"granularity": "fine_to_coarse"})
# the 1/5th rule and the agreement guard in the current default's search (session 26): sections 8 and 12 measured
# them before the activation start and the weight seed were part of the default (`default-adaptive`,
# `default-guarded`); against `default-nograd`, which differs only in them
VARIANTS["default-nograd-adaptive"] = ("default", {**_FROZEN["default"], **_NO_GRADIENT,
                                                   "step_adaptation": "one_fifth"})
VARIANTS["default-nograd-guarded"] = ("default", {**_FROZEN["default"], **_NO_GRADIENT, "agreement_guard": True})
# ... and the 1/5th rule in the whole current default (its gradient stage and lossless check kept): does what it adds
# to the search survive the stage?
VARIANTS["default-onefifth"] = ("default", {"step_adaptation": "one_fifth"})
# fast as it was from session 20 until session 36: its stage's early checks could cut the rate (no grace). The
# `fast` records of accuracy.json before session 37 are this preset and were renamed to it; the fast variants above
# ran with it too, so they keep it
VARIANTS["fast-grace0"] = ("fast", {"gradient_grace": 0})
# the default's stage with the grace its checks every 100 steps need (FINDINGS sections 44-47): 34 of the matrix's
# staged default runs cut their rate at the step-100 check, among them every LeViT-like e2e W3A4 seed (its weakest
# row). Measured under this name against a same-call control in sessions 38-39, then made the default (session 39):
# accuracy.json's records of it were renamed `default`
VARIANTS["default-grace110"] = ("default", {"gradient_grace": 110})
# `fast` (with its grace) and the clip of the weights at the stage's first overshoot: README advised the clip at 2-bit
# FX weights before the grace, which lets most early overshoots pass (session 40)
VARIANTS["fast-overshoot"] = ("fast", {"gradient_clip_weights": "on_overshoot"})
for _name in ("fast-stage300", "fast-stage300-lossless", "fast-weightseed", "fast-lr003", "fast-passes6"):
    VARIANTS[_name][1]["gradient_grace"] = 0
# the default as it was until session 39: its stage's checks could cut the rate from the first (no grace). Its
# records whose stage was cut at step 100 were renamed to it (`START+default-grace0` likewise); the others ran
# the same steps as the default does now. The default variants above ran with it, so they keep it
VARIANTS["default-grace0"] = ("default", {"gradient_grace": 0})
for _name, (_preset, _overrides) in VARIANTS.items():
    if _preset == "default" and _name != "default-grace110":
        _overrides.setdefault("gradient_grace", 0)
PRESETS = ["default", "paper", "fast", *VARIANTS]
METHODS = {
    "e2e": ["fp32", "baseline", "default", "paper", "fast", "paper-mse", "default-unseeded", "histogram",
            "histogram+default"],
    "linear": ["fp32", "baseline", "default", "paper", "fast", "paper-mse", "default-unseeded", "modelopt-mse",
               "modelopt-local_hessian",
               "modelopt-gptq", "modelopt-mse+default", "modelopt-local_hessian+default", "modelopt-gptq+default"],
    "pt2e": ["fp32", "baseline", "default", "paper"],
    "e2e-stem8": ["fp32", "baseline", "default", "paper", "fast"],
    "e2e-add8": ["fp32", "baseline", "default", "paper", "fast"],
    "e2e-mulexact": ["fp32", "baseline", "default", "paper", "fast"],
    "e2e-add8-mulexact": ["fp32", "baseline", "default", "paper", "fast"],
    "e2e-stem8-mulexact": ["fp32", "baseline", "default", "paper", "fast"],
}
FRAMEWORK = {"e2e": "fx", "linear": "modelopt", "pt2e": "pt2e", "e2e-stem8": "fx", "e2e-add8": "fx",
             "e2e-mulexact": "fx", "e2e-add8-mulexact": "fx", "e2e-stem8-mulexact": "fx"}
OUT = Path("benchmarks/results/accuracy.json")
logger = logging.getLogger("benchmarks.accuracy")


PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def search_config(name: str, seed: int, device: torch.device):
    """The preset ``name`` (``"default@fp32"``: the preset with its search run in fp32 instead of ``auto``)."""
    from cptv_plugin import SearchConfig

    name, _, precision = name.partition("@")
    preset, overrides = VARIANTS.get(name, (name, {}))
    config = SearchConfig.preset(preset, seed=seed, progress=False, **overrides).replace(name=name)
    return config.replace(precision=precision) if precision else config


def split_method(method: str) -> tuple[str, str | None]:
    """``"histogram+default"`` → start ``"histogram"``, search ``"default"``; ``"paper"`` → baseline + paper;
    ``"default@fp32"`` → baseline + default searched in fp32."""
    if "+" in method:
        start, search = method.split("+", 1)
        return start, search
    if method.partition("@")[0] in PRESETS:
        return "baseline", method
    return method, None


def valid_method(method: str, placement: str) -> bool:
    """fp32, a starting point of the placement, a preset (optionally ``@precision``), or ``start+preset``."""
    if method == "fp32":
        return True
    start, search = split_method(method)
    if search is None:
        return start in STARTS[placement]
    preset, _, precision = search.partition("@")
    return start in STARTS[placement] and preset in PRESETS and (not precision or precision in PRECISIONS)


# ------------------------------------------------------------------------------------------ quantizers


def quantize_e2e(model, calib, bits: str, start: str, eight_bit_activations: tuple = (), unquantized: tuple = ()):
    """torch.ao FX PTQ (global qconfig) → the prepared GraphModule; what ``eight_bit_activations`` names (module
    paths, or op types such as ``operator.add``) keeps the weights' bits with 8-bit activations (mixed precision,
    e.g. a stem or the residual adds); the op types in ``unquantized`` get qconfig None."""
    from torch.ao.quantization import HistogramObserver
    from torch.ao.quantization.quantize_fx import prepare_fx

    from cptv_plugin.qconfigs import fx_qconfig_mapping, parse_bits, prepare_timm_for_fx

    observer = HistogramObserver if start == "histogram" else None
    mapping = fx_qconfig_mapping(bits, activation_observer=observer)
    wider = fx_qconfig_mapping(f"W{parse_bits(bits)[0]}A8", activation_observer=observer).global_qconfig
    for name in eight_bit_activations:
        if isinstance(name, str):
            mapping.set_module_name(name, wider)
        else:
            mapping.set_object_type(name, wider)
    for op in unquantized:
        mapping.set_object_type(op, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(prepare_timm_for_fx(copy.deepcopy(model)).eval(), mapping,
                              example_inputs=(calib[:1],))
    with torch.no_grad():
        for batch in calib.split(100):
            prepared(batch)
    return prepared


def stem_modules(model_name: str, model) -> tuple[str, ...]:
    """The modules ``e2e-stem8`` keeps at 8-bit activations; an error if the model has none of that name."""
    names = STEMS.get(model_name, DEFAULT_STEM)
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{model_name} has no module {name!r} to keep at 8-bit activations: add its stem's module "
                             "path to STEMS in benchmarks/accuracy.py") from None
    return names


def quantize_linear(model, calib, bits: str, start: str):
    """ModelOpt PTQ with its default placement; ``start`` picks the amax calibration algorithm."""
    import modelopt.torch.quantization as mtq

    from cptv_plugin.qconfigs import modelopt_config

    algorithm = start.removeprefix("modelopt-") if start.startswith("modelopt-") else "max"
    config = modelopt_config(bits, algorithm)

    def forward_loop(m):
        with torch.no_grad():
            for batch in calib.split(100):
                m(batch)

    return mtq.quantize(copy.deepcopy(model), config, forward_loop)


def quantize_pt2e(model, calib, bits: str, start: str):
    """torchao PT2E with the XNNPACK quantizer (W bits per channel; XNNPACK's activations are 8-bit)."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from cptv_plugin.qconfigs import parse_bits, pt2e_quantizer

    if parse_bits(bits)[1] != 8:
        raise ValueError("the XNNPACK quantizer quantizes activations with 8 bits only")
    quantizer = pt2e_quantizer(bits)
    batch = torch.export.Dim("batch", min=1, max=4096)
    exported = torch.export.export(copy.deepcopy(model).eval(), (calib[:2],), dynamic_shapes=({0: batch},)).module()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for images in calib.split(100):
            prepared(images)
    return prepared


def fx_target(placement: str, bits: str) -> str | None:
    """How FX activations below 8 bits are simulated. torch.ao's convert_fx lowers every activation to quint8 with
    the full 0–255 range whatever the observer's narrowed range, so a "4-bit" activation there only has a coarser
    scale and 240 levels of headroom; the benchmark measures real 4-bit activations (``"fake_quant"``: the
    narrowed range, as FakeQuantize and QAT export compute it) and keeps ``"convert_fx"`` for 8 bits."""
    from cptv_plugin.qconfigs import parse_bits

    if FRAMEWORK[placement] != "fx":
        return None
    return "fake_quant" if parse_bits(bits)[1] < 8 else "convert_fx"


def evaluation_model(quantized, placement: str, bits: str):
    """What to measure: ModelOpt models directly; FX models as the simulated quantized model."""
    if placement == "linear":
        return quantized.eval()
    from cptv_plugin.fx.refine import FxSession

    if placement == "pt2e":
        return FxSession(quantized, flavor="pt2e").eval_module
    return FxSession(quantized, target=fx_target(placement, bits)).eval_module


# ------------------------------------------------------------------------------------------ one run


def run_one(model_name: str, model, bits: str, placement: str, method: str, seed: int, calib, test_x, test_y,
            device: torch.device, compile: bool = False, fp32_logits: torch.Tensor | None = None) -> dict:
    """One record; with ``fp32_logits`` (the full-precision model's on ``test_x``) it also carries the per-image
    verdicts and the distance from the full-precision model on the test set (:func:`outcome_on_test_set`)."""
    import cptv_plugin
    from cptv_plugin.refinement import _device_name
    from cptv_plugin.train import predict_logits

    record = {"model": model_name, "bits": bits, "placement": placement,
              "framework": FRAMEWORK[placement], "method": method, "seed": seed,
              "calibration_images": len(calib), "test_images": len(test_x), "device": _device_name(device)}
    start_time = time.time()
    if method == "fp32":
        logits = fp32_logits if fp32_logits is not None else predict_logits(model, test_x)  # computed once per model
        record.update(outcome_on_test_set(logits, test_y, fp32_logits), seconds=0.0, evaluations=0)
        return record
    start, search = split_method(method)
    if placement.startswith("e2e-"):  # mixed precision: modules or op types kept at 8 bits, op types unquantized
        wide = (stem_modules(model_name, model) if placement.startswith("e2e-stem8")
                else EIGHT_BIT_OPS.get(placement, ()))
        quantized = quantize_e2e(model, calib, bits, start, wide, UNQUANTIZED_OPS.get(placement, ()))
    else:
        quantized = {"e2e": quantize_e2e, "linear": quantize_linear, "pt2e": quantize_pt2e}[placement](
            model, calib, bits, start)
    calibrated = time.time() - start_time
    result = None
    target = fx_target(placement, bits)
    if target is not None:
        record["activation_range"] = "narrowed" if target == "fake_quant" else "dtype"
    if search is not None:
        options = {"target": target} if target is not None else {}
        config = search_config(search, seed, device).replace(compile=compile)
        called = time.time()
        result = cptv_plugin.refine(quantized, calib, config=config, **options)
        record["refine_seconds"] = round(time.time() - called, 2)  # the call, the framework's analysis included
        if result.interrupted:  # the search keeps its best scales on Ctrl-C: a shortened run is no record
            raise KeyboardInterrupt(f"{method} {bits} seed {seed} interrupted after {result.evaluations} "
                                    "evaluations: not recorded")
        record["compiled"] = result.compiled
    logits = predict_logits(evaluation_model(quantized, placement, bits), test_x)
    record.update(outcome_on_test_set(logits, test_y, fp32_logits),
                  seconds=round(result.seconds if result else calibrated, 2),
                  evaluations=result.evaluations if result else 0)
    if result is not None:
        record.update(fitness=[result.initial_fitness, result.final_fitness], precision=result.precision,
                      history=[round(h["fitness"], 6) for h in result.history],
                      passes=result.config.passes)
        if result.agreement is not None:
            record["agreement"] = result.agreement
        if result.validation is not None:
            record["validation"] = result.validation
        if result.start is not None:
            record["start"] = result.start
        if result.gradient is not None:
            record["gradient"] = result.gradient
        if result.lossless is not None:
            record["lossless"] = result.lossless
    return record


def outcome_on_test_set(logits: torch.Tensor, labels: torch.Tensor, fp32_logits: torch.Tensor | None) -> dict:
    """``top1``; with ``fp32_logits`` also ``correct`` (which test images were right: packed bits, base64; what
    :func:`paired_test` compares) and ``fp32_fidelity`` (top-1 agreement in percent and mean KL divergence from the
    full-precision model's outputs on the test set: at rows within a few images of FP32, a far less noisy measure
    than top-1 on labels)."""
    import base64

    import numpy as np

    correct = logits.argmax(-1) == labels.cpu()
    outcome = {"top1": 100.0 * correct.sum().item() / len(labels)}
    if fp32_logits is None:
        return outcome
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), fp32_logits.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    agreement = (logits.argmax(-1) == fp32_logits.argmax(-1)).float().mean().item()
    outcome["correct"] = base64.b64encode(np.packbits(correct.numpy()).tobytes()).decode()
    outcome["fp32_fidelity"] = {"agreement": round(100.0 * agreement, 4), "kl": round(kl.item(), 7)}
    return outcome


def correct_images(record: dict) -> "torch.Tensor":
    """The per-image verdicts of a record with ``correct`` (bool tensor over its test images)."""
    import base64

    import numpy as np

    bits = np.unpackbits(np.frombuffer(base64.b64decode(record["correct"]), dtype=np.uint8))
    return torch.from_numpy(bits[: record["test_images"]].astype(bool))


def paired_test(first: dict, second: dict) -> dict:
    """Exact McNemar test of two records on the same test images: ``only_first`` / ``only_second`` images right
    in one record alone, and the two-sided p-value that the two models are equally accurate."""
    if (first["model"], first["test_images"]) != (second["model"], second["test_images"]):
        raise ValueError("a paired test needs two runs of one model on the same test images (got "
                         f"{first['model']} on {first['test_images']}, {second['model']} on {second['test_images']})")
    a, b = correct_images(first), correct_images(second)
    only_first, only_second = int((a & ~b).sum()), int((~a & b).sum())
    return {"only_first": only_first, "only_second": only_second, "p": _sign_test(only_first, only_second)}


def _sign_test(first: int, second: int) -> float:
    """Two-sided exact p-value that ``first`` and ``second`` successes out of their sum are equally likely."""
    import math

    n, low = first + second, min(first, second)
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(low + 1)) / 2 ** n) if n else 1.0


def images_behind(first: dict, second: dict) -> int | None:
    """How many more test images ``second`` got right than ``first``, from the two records' top-1 alone (exact: a
    record's top-1 is its count of right images over ``test_images``); None unless both name the same test count."""
    count = first.get("test_images")
    if not count or second.get("test_images") != count:
        return None
    return round((second["top1"] - first["top1"]) * count / 100)


def smallest_mcnemar_p(images: int) -> float:
    """The smallest two-sided exact McNemar p-value that two runs ``images`` test images apart in top-1 can reach,
    whichever images differ: the one where every differing image favours the same run. Each further pair of
    images, one for each side, only raises it, so a gap of a few images is chance without per-image verdicts."""
    return _sign_test(abs(images), 0)


def pooled_test(pairs: list[tuple[dict, dict]]) -> dict:
    """Exact sign test of two methods over several paired runs on the same test images (e.g. seeds): per image, the
    runs only the first got right minus those only the second got right; ``images_first`` / ``images_second``
    count the images where that net count favours one side, and ``p`` is the two-sided p-value that neither is more
    accurate. The image is the unit: the seeds share the test set, and an image that flips at every seed is one
    piece of evidence, not one per seed (summing the seeds' McNemar counts would count it several times)."""
    if not pairs:
        raise ValueError("a pooled test needs at least one pair of runs")
    if len({(r["model"], r["test_images"]) for pair in pairs for r in pair}) > 1:
        raise ValueError("a pooled test needs runs of one model on the same test images (got "
                         f"{sorted({(r['model'], r['test_images']) for pair in pairs for r in pair})})")
    net = sum(correct_images(a).int() - correct_images(b).int() for a, b in pairs)
    first, second = int((net > 0).sum()), int((net < 0).sum())
    return {"images_first": first, "images_second": second, "runs": len(pairs), "p": _sign_test(first, second)}


def key(record: dict) -> tuple:
    return (record["model"], record["bits"], record["placement"], record["method"], record["seed"],
            record.get("calibration_images"), record.get("test_images"))


def load_records(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def save_records(path: Path, records: list[dict]) -> None:
    """Write ``records`` as JSON, atomically (a temporary file per process, renamed onto ``path``)."""
    from cptv_plugin._io import atomic_path

    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(records, indent=1))


def data_for(args, model_name: str, model, seed: int, device: torch.device):
    """(calibration images, test images, test labels) on ``device``."""
    from cptv_plugin.datasets import fashion_mnist_splits, image_folder_transform, load_image_folder

    if args.imagenet:
        transform = image_folder_transform(model)
        calib = load_image_folder(args.imagenet_calibration or args.imagenet, transform, args.calibration, seed)
        test_x, test_y = load_image_folder(args.imagenet, transform, args.test_images, 0, with_labels=True)
    else:
        calib, test_x, test_y = fashion_mnist_splits(args.calibration, args.test_images, seed)
    return calib.to(device), test_x.to(device), test_y


def method_tier(method: str) -> int:
    """Order of work: the core comparison first, then the other presets and starting points, then stacked runs."""
    if method in ("fp32", "baseline", "default", "paper"):
        return 0
    return 2 if "+" in method or "@" in method else 1


def tasks(args) -> list[dict]:
    """Every run the arguments ask for, most important first (so a partial run is a useful one)."""
    models = [args.imagenet_model] if args.imagenet else args.models
    only = {tuple(run.split(":")) for run in getattr(args, "only", None) or ()}
    if any(len(run) != 4 for run in only):
        raise SystemExit(f"--only takes MODEL:PLACEMENT:BITS:SEED, e.g. fmnist_levit:e2e:W3A4:0 (got {args.only})")
    found = []
    for model_name in models:
        for seed in args.seeds:
            for placement in args.placements:
                for bits in args.bits:
                    for method in args.methods or METHODS[placement]:
                        if not valid_method(method, placement) or (placement == "pt2e" and not bits.endswith("A8")):
                            continue
                        if method == "fp32" and bits != args.bits[0]:
                            continue  # one fp32 record per model, placement and seed
                        if only and (model_name, placement, bits, str(seed)) not in only:
                            continue
                        found.append({"model": model_name, "bits": bits, "placement": placement, "method": method,
                                      "seed": seed})
    # stable: models and bits stay in order; seeds in the order given (a call cut short keeps the first ones)
    return sorted(found, key=lambda t: (method_tier(t["method"]), args.seeds.index(t["seed"])))


def _claim(claims: Path | None, task: dict) -> bool:
    """Atomically take ``task`` for this worker (``claims``: a folder shared by the workers; None: no sharing)."""
    if claims is None:
        return True
    name = "_".join(str(task.get(k)) for k in ("model", "bits", "placement", "method", "seed", "calibration_images",
                                                "test_images")).replace("/", "-")
    try:
        os.close(os.open(claims / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def run(args) -> list[dict]:
    """Run the tasks not yet recorded in ``--out`` (this process alone, or as one of ``--workers`` processes)."""
    from cptv_plugin.models import build_model, load_reference_model
    from cptv_plugin.train import predict_logits

    device = torch.device(args.device)
    out = Path(args.out)
    records = load_records(out)
    done = {key(r) for r in records}
    claims = Path(args.claims) if args.claims else None
    deadline = time.time() + args.deadline if args.deadline else None
    models: dict[str, torch.nn.Module] = {}
    data: dict[tuple, tuple] = {}
    fp32_logits: dict[tuple, torch.Tensor] = {}
    failures: list[dict] = []
    for task in tasks(args):
        if deadline is not None and time.time() > deadline:
            logger.warning("deadline reached: remaining tasks left for a later run")
            break
        model_name, seed = task["model"], task["seed"]
        if model_name not in models:
            models[model_name] = (build_model(model_name, **json.loads(args.imagenet_model_kwargs)) if args.imagenet
                                  else load_reference_model(model_name)).eval().to(device)
        model = models[model_name]
        if (model_name, seed) not in data:
            data[(model_name, seed)] = data_for(args, model_name, model, seed, device)
        calib, test_x, test_y = data[(model_name, seed)]
        probe = dict(task, calibration_images=len(calib), test_images=len(test_x))
        if key(probe) in done or not _claim(claims, probe):
            continue
        if (model_name, len(test_x)) not in fp32_logits:
            fp32_logits[(model_name, len(test_x))] = predict_logits(model, test_x)
        torch.manual_seed(seed)
        try:
            record = run_one(model_name, model, task["bits"], task["placement"], task["method"], seed, calib, test_x,
                             test_y, device, compile=args.compile,
                             fp32_logits=fp32_logits[(model_name, len(test_x))])
        except Exception:  # one broken run must not cost the rest of a device session; reported, not recorded
            logger.exception("run failed: %s", probe)
            failures.append(probe)
            continue
        records.append(record)
        done.add(key(record))
        save_records(out, records)
        print(json.dumps({k: v for k, v in record.items() if k not in ("history", "correct")}), flush=True)
    if failures:
        raise SystemExit(f"{len(failures)} run(s) failed (see the log above); the others were recorded")
    return records


def run_workers(args, argv: list[str]) -> list[dict]:
    """Share the tasks among ``args.workers`` processes on one device; each writes its own file, merged into
    ``--out`` at the end (also after a failure, a deadline or SIGINT). On one H100, 12 processes gave 1.35× the
    throughput of one for the reference models (they are bound by memory traffic): the gain is mostly a device
    call kept busy to its deadline."""
    import shutil
    import subprocess
    import tempfile

    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="cptv-accuracy-"))
    (work / "claims").mkdir()
    for record in load_records(out):  # already recorded: claimed by nobody, skipped by everyone
        _claim(work / "claims", record)
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    processes = []
    for index in range(args.workers):
        command = [sys.executable, "-m", "benchmarks.accuracy", *_without_option(argv, "--workers", "--out"),
                   "--workers", "1", "--claims", str(work / "claims"), "--out", str(work / f"worker{index}.json")]
        environment = dict(os.environ, OMP_NUM_THREADS=str(threads))
        processes.append(subprocess.Popen(command, env=environment))
    try:
        failed = [p.wait() for p in processes]
    except KeyboardInterrupt:  # e.g. `timeout -s INT`: stop the workers, keep what they finished
        for process in processes:
            process.send_signal(signal.SIGINT)
        failed = [p.wait() for p in processes]
    merged = load_records(out)
    seen = {key(r) for r in merged}
    for index in range(args.workers):
        for record in load_records(work / f"worker{index}.json"):
            if key(record) not in seen:
                merged.append(record)
                seen.add(key(record))
    save_records(out, merged)
    shutil.rmtree(work, ignore_errors=True)
    if any(failed):
        logger.warning("%d worker(s) failed; their finished records were kept", sum(1 for c in failed if c))
    return merged


def _without_option(argv: list[str], *options: str) -> list[str]:
    """``argv`` without ``--option VALUE`` pairs for the given options."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in options:
            skip = True
            continue
        kept.append(arg)
    return kept


# ------------------------------------------------------------------------------------------ report


def _top1_table(groups: dict[tuple, dict[str, list[float]]], methods: list[str]) -> str:
    """One row per (model, placement, bits) that has a record of ``methods``; a cell is the mean ± std over seeds."""
    lines = ["| model | placement | bits | " + " | ".join(methods) + " |",
             "|---" * (3 + len(methods)) + "|"]
    for (model, placement, bits), values in sorted(groups.items()):
        if not any(values.get(method) for method in methods):
            continue
        cells = []
        for method in methods:
            v = values.get(method)
            if not v:
                cells.append("")
            elif len(v) == 1:
                cells.append(f"{v[0]:.2f}")
            else:
                cells.append(f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f} (n={len(v)})")
        lines.append(f"| {model} | {placement} | {bits} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(records: list[dict], out_dir: Path, stem: str = "accuracy") -> str:
    """Markdown tables (mean ± std of top-1 over seeds) and plots, named after the record file: ``{stem}.md``,
    ``{stem}.png`` and ``fitness.png`` (``{stem}_fitness.png`` for another file than ``accuracy.json``).

    The matrix's own methods (presets, the calibrations users pick instead, refinement started from them) make the
    first table; the benchmark's variants, where there are any, a second one beside fp32, baseline and default."""
    groups: dict[tuple, dict[str, list[float]]] = {}
    methods: list[str] = []
    for r in records:
        row = (r["model"], r["placement"], r["bits"] if r["method"] != "fp32" else "FP32")
        groups.setdefault(row, {}).setdefault(r["method"], []).append(r["top1"])
        if r["method"] not in methods:
            methods.append(r["method"])
    listed = list(dict.fromkeys(METHODS["e2e"] + METHODS["linear"]))  # the matrix's own order, then the rest
    methods.sort(key=lambda m: (listed.index(m), "") if m in listed else (len(listed), m))
    matrix = [m for m in methods if m in listed]
    variants = [m for m in methods if m not in listed]
    if matrix and variants:
        variant_groups = {row: values for row, values in groups.items() if any(m in values for m in variants)}
        table = ("## The matrix: presets, the calibrations users pick instead, and refinement started from them\n\n"
                 + _top1_table(groups, matrix)
                 + "\n## Variants and ablations (`VARIANTS` in `benchmarks/accuracy.py`; `FINDINGS.md` says what each "
                   "measured), beside fp32, baseline and default\n\n"
                 + _top1_table(variant_groups, [m for m in ("fp32", "baseline", "default") if m in matrix]
                               + variants))
    else:
        table = _top1_table(groups, methods)
    (out_dir / f"{stem}.md").write_text(
        "# Top-1 (%) on the Fashion-MNIST test set: mean ± std over seeds\n\n"
        f"Generated by `python -m benchmarks.accuracy --report` from `{stem}.json`. Fashion-MNIST models "
        "trained here, not ImageNet models.\n\n" + table + goals_report(records) + cost_report(records)
        + paired_report(records) + pooled_report(records))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots")
        return table
    settings = sorted({(r["model"], r["placement"]) for r in records})
    colors = plt.get_cmap("tab20")  # one colour per method across all panels
    figure, axes = plt.subplots(len(settings), 1, figsize=(13, 3.2 * len(settings)), squeeze=False)
    for axis, (model, placement) in zip(axes[:, 0], settings):
        bits = [b for b in BITS if (model, placement, b) in groups]
        present = {m for b in bits for m in groups.get((model, placement, b), {})}
        shown = [m for m in methods if m != "fp32" and m in present]
        width = 0.8 / max(len(shown), 1)
        for index, method in enumerate(shown):
            means = []
            for b in bits:
                v = groups.get((model, placement, b), {}).get(method, [])
                means.append(statistics.mean(v) if v else float("nan"))
            axis.bar([i + index * width for i in range(len(bits))], means, width, label=method,
                     color=colors(methods.index(method) % 20))
        fp32 = groups.get((model, placement, "FP32"), {}).get("fp32")
        if fp32:
            axis.axhline(statistics.mean(fp32), color="black", linestyle="--", linewidth=1, label="fp32")
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(bits))], bits)
        axis.set_ylabel("top-1 %")
        axis.set_title(f"{model}, {placement} placement")
        axis.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(out_dir / f"{stem}.png", dpi=110)
    figure, axis = plt.subplots(figsize=(8, 4))
    for r in records:
        if r.get("history") and r["seed"] == min(x["seed"] for x in records):
            per_pass = len(r["history"]) // max(r.get("passes", 1), 1)
            curve = [r["fitness"][0]] + r["history"][per_pass - 1::per_pass]
            axis.plot(range(len(curve)), curve, label=f"{r['model']} {r['bits']} {r['placement']} {r['method']}",
                      linewidth=1)
    axis.set_xlabel("pass")
    axis.set_ylabel("fitness (calibration set)")
    axis.legend(fontsize=5, ncol=2)
    figure.tight_layout()
    figure.savefig(out_dir / ("fitness.png" if stem == "accuracy" else f"{stem}_fitness.png"), dpi=110)
    return table


def runs_by_key(records: list[dict], keep: Callable[[dict], bool] = lambda r: True) -> dict[tuple, dict]:
    """The records that ``keep`` accepts, by (model, placement, bits, seed, method): the key the reports look runs
    up by."""
    return {(r["model"], r["placement"], r["bits"], r["seed"], r["method"]): r for r in records if keep(r)}


def _gain_and_seconds(runs: dict[tuple, dict], row: tuple, method: str) -> tuple[float, float] | None:
    """``method``'s mean gain over the baseline and its mean seconds per run, over the seeds of ``row`` (model,
    placement, bits) that recorded both (``runs``: records by model, placement, bits, seed, method); None if none."""
    pairs = [(r, runs[(*row, seed, "baseline")]) for (*head, seed, m), r in runs.items()
             if tuple(head) == row and m == method and (*row, seed, "baseline") in runs]
    if not pairs:
        return None
    return (statistics.mean(r["top1"] - b["top1"] for r, b in pairs),
            statistics.mean(r.get("seconds", 0.0) for r, _ in pairs))


# the accuracy issue's goals: absolute top-1 on the DeiT-like model's linear placement (the reference ViT,
# ModelOpt's placement), half of the baseline-to-FP32 gap closed at the other low-bit rows
ABSOLUTE_GOALS = {("fmnist_deit_tiny", "linear", "W4A4"): 86.0, ("fmnist_deit_tiny", "linear", "W3A4"): 85.0,
                  ("fmnist_deit_tiny", "linear", "W2A8"): 85.0}
LOW_BITS = ("W4A4", "W3A4", "W2A8")
# what users pick instead of our refinement, per placement (the issue: "ModelOpt's mse and local_hessian, torch.ao's
# HistogramObserver"; GPTQ as well where it was measured)
ALTERNATIVES = {"e2e": ("histogram",), "linear": ("modelopt-mse", "modelopt-local_hessian", "modelopt-gptq")}


def goals_report(records: list[dict]) -> str:
    """The accuracy issue's goals, row by row, from the records: what is met, what is not, on how many seeds.

    Low-bit rows (W4A4, W3A4, W2A8): the default's mean against the goal (absolute top-1 on the DeiT-like linear
    rows, half of the baseline-to-FP32 gap elsewhere), against each calibration users pick instead, and each of
    those starts refined by the default against the start itself. Every row: the default against the paper preset
    seed by seed (wins / seeds), and the 8-bit-activation rows' "never below the baseline" (seeds below / seeds).
    A cell counts only seeds both sides recorded; a seed that misses the paper or the baseline is tested image by
    image (exact McNemar) where both records carry their per-image verdicts, and otherwise gets the smallest p-value
    its top-1 gap in test images allows. Markdown ("" without default records)."""
    top1: dict[tuple, dict[str, dict[int, float]]] = {}
    runs = runs_by_key(records)
    fp32: dict[str, list[float]] = {}
    for r in records:
        if r["method"] == "fp32":
            fp32.setdefault(r["model"], []).append(r["top1"])
        else:
            top1.setdefault((r["model"], r["placement"], r["bits"]), {}).setdefault(r["method"], {})[r["seed"]] = \
                r["top1"]
    rows = sorted(row for row, methods in top1.items() if "default" in methods and "baseline" in methods)
    if not rows:
        return ""

    def paired(values: dict, first: str, second: str) -> list[tuple[int, float, float]]:
        """(seed, first's top-1, second's top-1) at the seeds both recorded."""
        return [(s, values[first][s], values[second][s]) for s in sorted(values.get(first, {}))
                if s in values.get(second, {})]

    def verdicts(row: tuple, pairs: list[tuple[int, float, float]], other: str) -> list[tuple[dict, dict]]:
        """The default's and ``other``'s records at the seeds of ``pairs`` that carry per-image verdicts."""
        both = [(runs[(*row, seed, "default")], runs[(*row, seed, other)]) for seed, _, _ in pairs]
        return [(a, b) for a, b in both if a.get("correct") and b.get("correct")]

    def won_lost(row: tuple, missed: list[tuple[int, float, float]], other: str,
                 every: list[tuple[int, float, float]]) -> str:
        """The default against ``other`` image by image at the seeds that missed (``missed``; a miss of a few images
        may be chance): " (won-lost, p)" per seed where both records carry their per-image verdicts, and, over all
        the paired seeds (``every``, not only those that missed), the images where the default / ``other`` was
        right at more seeds (one sign test with the image as the unit)."""
        tested = {a["seed"]: paired_test(a, b) for a, b in verdicts(row, missed, other)}
        if len(tested) < len(missed):
            return gap_bounds(row, missed, other, tested)
        text = ", ".join(f"{t['only_first']}-{t['only_second']} p={t['p']:.2f}" for t in tested.values())
        pairs = verdicts(row, every, other)
        if len(every) > 1 and len(pairs) == len(every):
            pooled = pooled_test(pairs)
            text += (f"; over all {pooled['runs']} seeds, images right at more seeds with the default / the {other}: "
                     f"{pooled['images_first']}-{pooled['images_second']} p={pooled['p']:.2f}")
        return " (test images only the default / only the " + other + " got right, exact McNemar p: " + text + ")"

    def gap_bounds(row: tuple, missed: list[tuple[int, float, float]], other: str, tested: dict[int, dict]) -> str:
        """Where some missed seed lacks per-image verdicts: each missed seed's test (``tested``, by seed), or, without
        verdicts, how many test images it is behind and the smallest exact McNemar p-value any images could give."""
        parts = []
        for seed, _, _ in missed:
            if seed in tested:
                parts.append(f"seed {seed} {tested[seed]['only_first']}-{tested[seed]['only_second']} "
                             f"p={tested[seed]['p']:.2f}")
                continue
            behind = images_behind(runs[(*row, seed, "default")], runs[(*row, seed, other)])
            if behind is None:
                return " (not tested image by image: a run has no per-image verdicts)"
            bound = smallest_mcnemar_p(behind)
            parts.append(f"seed {seed} {behind} test images behind, p ≥ "
                         + (f"{bound:.2f}" if bound >= 0.01 else f"{bound:.1e}") + " whichever images differ")
        return " (not every run has per-image verdicts; exact McNemar: " + "; ".join(parts) + ")"

    def per_point(row: tuple, method: str) -> float | None:
        """Mean seconds per point gained over the baseline (same seeds); None without a gain."""
        measured = _gain_and_seconds(runs, row, method)
        return measured[1] / measured[0] if measured and measured[0] > 0 else None

    def seed_per_point(row: tuple, seed: int, method: str) -> float | None:
        """``method``'s seconds per point gained over the baseline at one seed; None without a gain."""
        run, base = runs[(*row, seed, method)], runs[(*row, seed, "baseline")]
        gain = run["top1"] - base["top1"]
        return run.get("seconds", 0.0) / gain if gain > 0 else None

    def gains_text(row: tuple, seed: int) -> str:
        """ " (gains 20 / 13 test images)": what the default and the paper bought over the baseline at one seed, in
        test images where the records name their count (a per-point cost divided by a handful of images is noise)."""
        base = runs[(*row, seed, "baseline")]
        gains = [images_behind(base, runs[(*row, seed, method)]) for method in ("default", "paper")]
        if None in gains:
            return ""
        return " (gains " + " / ".join(f"{gain:,}" for gain in gains) + " test images)"

    def dearer(ours: float | None, theirs: float | None) -> bool:
        return theirs is not None and (ours is None or ours > theirs)

    def costs_text(ours: float | None, theirs: float | None) -> str:
        return " / ".join("no gain" if v is None else f"{v:.2f}" if v < 10 else f"{v:.0f}" for v in (ours, theirs))

    low = ["| model | placement | bits | baseline | default | FP32 | goal | met | default vs users' picks "
           "| START+default vs START | default > paper, seeds | s per point, default / paper |", "|---" * 12 + "|"]
    high = ["| model | placement | bits | baseline | default | default below baseline, seeds "
            "| default > paper, seeds | s per point, default / paper |", "|---" * 8 + "|"]
    short: list[str] = []
    for row in rows:
        model, placement, bits = row
        values = top1[row]
        base, default = (statistics.mean(values[m].values()) for m in ("baseline", "default"))
        n = len(values["default"])
        versus_paper = paired(values, "default", "paper")
        paper_cell = (f"{sum(d > p for _, d, p in versus_paper)} / {len(versus_paper)}" if versus_paper else "")
        if versus_paper and not all(d > p for _, d, p in versus_paper):
            short.append(f"{model} {placement} {bits}: default > paper at {paper_cell} seeds"
                         + won_lost(row, [pair for pair in versus_paper if pair[1] <= pair[2]], "paper",
                                    versus_paper))
        ours, theirs = per_point(row, "default"), per_point(row, "paper")
        costs = costs_text(ours, theirs)
        note = " (timed alone)" if versus_paper and all(runs[(*row, s, m)].get("timed_alone")
                                                         for m in ("default", "paper") for s in values[m]) else ""
        cost_cell = costs + note if versus_paper else ""
        if dearer(ours, theirs):
            short.append(f"{model} {placement} {bits}: default dearer per point than paper, {costs} s{note}")
        # the issue asks it of every seed, not only of the means
        seed_costs = [(seed, seed_per_point(row, seed, "default"), seed_per_point(row, seed, "paper"))
                      for seed, _, _ in versus_paper if seed in values["baseline"]]
        dearer_seeds = [(seed, a, b) for seed, a, b in seed_costs if dearer(a, b)]
        if dearer_seeds:
            short.append(f"{model} {placement} {bits}: default dearer per point than paper at {len(dearer_seeds)} / "
                         f"{len(seed_costs)} seeds (s per point, default / paper: "
                         + ", ".join(f"seed {seed} {costs_text(a, b)}{gains_text(row, seed)}"
                                     for seed, a, b in dearer_seeds) + f"){note}")
        if bits not in LOW_BITS:
            below = paired(values, "default", "baseline")
            lost = [pair for pair in below if pair[1] < pair[2]]
            if lost:
                short.append(f"{model} {placement} {bits}: default below the baseline at {len(lost)} / {len(below)} "
                             "seeds" + won_lost(row, lost, "baseline", below))
            high.append(f"| {model} | {placement} | {bits} | {base:.2f} | {default:.2f} (n={n}) "
                        f"| {len(lost)} / {len(below)} | {paper_cell} | {cost_cell} |")
            continue
        full = statistics.mean(fp32[model]) if model in fp32 else None
        if row in ABSOLUTE_GOALS:
            goal, met = f"≥ {ABSOLUTE_GOALS[row]:g}", default >= ABSOLUTE_GOALS[row]
        elif full is not None and full > base:
            closed = (default - base) / (full - base)
            goal, met = f"half the gap (closed {100 * closed:.0f} %)", closed >= 0.5
        else:
            goal, met = "", None
        if met is False:
            short.append(f"{model} {placement} {bits}: {goal}")
        picks, stacked = [], []
        for pick in ALTERNATIVES.get(placement, ()):
            if pick in values:
                mean = statistics.mean(list(values[pick].values()))
                picks.append(f"{pick} {mean:.2f} {'<' if mean < default else '≥'}")
                if mean >= default:
                    short.append(f"{model} {placement} {bits}: {pick} {mean:.2f} ≥ default {default:.2f}")
            both = paired(values, f"{pick}+default", pick)
            if both:
                gain = statistics.mean([a - b for _, a, b in both])
                stacked.append(f"{pick}: {gain:+.2f} (n={len(both)})")
                if gain <= 0:
                    short.append(f"{model} {placement} {bits}: {pick}+default does not improve {pick}")
        verdict = "" if met is None else "yes" if met else "**no**"
        low.append(f"| {model} | {placement} | {bits} | {base:.2f} | {default:.2f} (n={n}) "
                   f"| {'' if full is None else f'{full:.2f}'} | {goal} | {verdict} "
                   f"| {'; '.join(picks)} | {'; '.join(stacked)} | {paper_cell} | {cost_cell} |")
    return ("\n## Against the accuracy issue's goals\n\nFrom the records above (means over seeds; a paired cell "
            "counts the seeds both methods recorded). Goals: ≥ 86 / 85 / 85 at the DeiT-like model's linear W4A4 / "
            "W3A4 / W2A8 rows, half of the baseline-to-FP32 gap closed at the other low-bit rows, the default above "
            "each calibration users pick instead, our refinement improving each of them, the default above the "
            "paper preset and no dearer per point gained, at every seed as well as on average (seconds as "
            "recorded: unless marked timed alone, runs of different device calls shared the GPU with different "
            "loads), and never below the baseline at 8-bit activations.\n\n"
            "### Low-bit rows\n\n" + "\n".join(low) + "\n\n### 8-bit activations\n\n" + "\n".join(high)
            + "\n\n### Short of a goal\n\n" + ("\n".join(f"- {line}" for line in short) if short else "- none")
            + "\n")


def cost_report(records: list[dict], methods: tuple[str, ...] = ("paper", "fast", "default")) -> str:
    """Per row, each method's mean gain over the baseline (same seeds) and mean seconds per run, and the seconds
    per point gained (the issue's "no slower per unit of gain"). Seconds are wall time with however many runs
    shared the device then: compare methods timed in the same calls."""
    top1 = runs_by_key(records)
    rows = sorted({k[:3] for k in top1 if k[4] in methods})
    lines = ["| model | placement | bits | " + " | ".join(f"{m}: gain / s / s per point" for m in methods) + " |",
             "|---" * (3 + len(methods)) + "|"]
    for row in rows:
        cells = []
        for method in methods:
            measured = _gain_and_seconds(top1, row, method)
            if measured is None:
                cells.append("")
                continue
            gain, seconds = measured
            per_point = f"{seconds / gain:.1f}" if gain > 0 else "no gain"
            cells.append(f"{gain:+.2f} / {seconds:.0f} / {per_point}")
        lines.append(f"| {' | '.join(row)} | " + " | ".join(cells) + " |")
    return ("\n## Seconds per point gained over the baseline\n\nMeans over the seeds that have a baseline record; "
            "seconds of the refinement (wall time, with the other runs of its device call sharing the GPU; "
            "records from session 18 on count the whole refinement, earlier ones the lossless check, the search and "
            "the gradient stage only).\n\n"
            + "\n".join(lines) + "\n")


def paired_report(records: list[dict], methods: tuple[str, ...] = ("baseline", "paper", "default")) -> str:
    """Per row and seed, for records that carry their distance from the full-precision model on the test set: each
    method's top-1 and that distance, and (where both carry per-image verdicts) exact McNemar tests of the default
    against the others ("" if no record carries them)."""
    runs = runs_by_key(records, lambda r: r.get("fp32_fidelity") and r["method"] in methods)
    rows = sorted({k[:4] for k in runs})
    if not rows:
        return ""
    first = methods[-1]
    lines = ["| model | placement | bits | seed | " + " | ".join(f"{m}: top-1 / FP32 agreement / KL" for m in methods)
             + " | " + " | ".join(f"{first} vs {m}: images won-lost (p)" for m in methods[:-1]) + " |",
             "|---" * (4 + 2 * len(methods) - 1) + "|"]
    for row in rows:
        cells = []
        for method in methods:
            r = runs.get((*row, method))
            cells.append("" if r is None else f"{r['top1']:.2f} / {r['fp32_fidelity']['agreement']:.2f} / "
                                              f"{r['fp32_fidelity']['kl']:.2e}")
        for method in methods[:-1]:
            a, b = runs.get((*row, first)), runs.get((*row, method))
            if a is None or b is None or not (a.get("correct") and b.get("correct")) \
                    or a["test_images"] != b["test_images"]:
                cells.append("")
                continue
            test = paired_test(a, b)
            cells.append(f"{test['only_first']}-{test['only_second']} ({test['p']:.2f})")
        lines.append("| " + " | ".join(str(v) for v in row) + " | " + " | ".join(cells) + " |")
    return ("\n## Paired on the test images\n\nRuns that recorded their distance from FP32 on the test set. "
            "FP32 agreement: % of test images with the full-precision model's top-1; KL: mean KL divergence from "
            "its outputs. Won-lost: images only the first method / only the other got right; p: exact McNemar "
            "test (two-sided) that both are equally accurate (only where both runs recorded which test images they got "
            "right).\n\n" + "\n".join(lines) + "\n")


def pooled_report(records: list[dict], others: tuple[str, ...] = ("baseline", "paper")) -> str:
    """Per row, the default against each of ``others`` over all the seeds both recorded with per-image verdicts
    (:func:`pooled_test`: one sign test, the test image as the unit); rows with fewer than two such seeds are left
    out ("" if none is left)."""
    runs = runs_by_key(records, lambda r: r.get("correct"))
    lines = []
    for row in sorted({k[:3] for k in runs if k[4] == "default"}):
        cells = []
        for other in others:
            pairs = [(r, runs[(*row, seed, other)]) for (*head, seed, method), r in sorted(runs.items())
                     if tuple(head) == row and method == "default" and (*row, seed, other) in runs]
            if len(pairs) < 2:
                cells.append("")
                continue
            test = pooled_test(pairs)
            chance = f"{test['p']:.2g}" if test["p"] >= 1e-10 else "< 1e-10"
            cells.append(f"{test['images_first']}-{test['images_second']} ({chance}; {test['runs']} seeds)")
        if any(cells):
            lines.append("| " + " | ".join(row) + " | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    header = ("| model | placement | bits | " + " | ".join(f"default vs {o}: images (p; seeds)" for o in others)
              + " |\n" + "|---" * (3 + len(others)) + "|\n")
    return ("\n## Pooled over the seeds, image by image\n\nThe default against each method over every seed both "
            "recorded with per-image verdicts: per test image, the seeds only the default got right minus those only "
            "the other got right; images: how many images that net count favours the default / the other; p: exact "
            "sign test (two-sided) over those images. The seeds share the test images, so the image is the unit: an "
            "image that flips at every seed counts once.\n\n" + header + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--bits", nargs="+", default=BITS)
    parser.add_argument("--methods", nargs="+", default=None, help="default: all of the placement's methods")
    parser.add_argument("--placements", nargs="+", default=["e2e", "linear", "pt2e"], choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="run in this order within each tier of methods (the core comparison first)")
    parser.add_argument("--only", nargs="+", default=None, metavar="MODEL:PLACEMENT:BITS:SEED",
                        help="run only these of the other options' runs (e.g. the rows a variant is for)")
    parser.add_argument("--calibration", type=int, default=1000)
    parser.add_argument("--test-images", type=int, default=None, help="default: the whole test set")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--imagenet", default=None, help="an ImageNet-layout folder of test images")
    parser.add_argument("--imagenet-calibration", default=None, help="folder to draw calibration images from")
    parser.add_argument("--imagenet-model", default="timm:deit_tiny_patch16_224")
    parser.add_argument("--imagenet-model-kwargs", default="{}", help="constructor kwargs as JSON")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the searches' evaluation segments (GPU)")
    parser.add_argument("--report", action="store_true", help="only write accuracy.md and the plots")
    parser.add_argument("--goals", action="store_true",
                        help="only print the accuracy issue's goals, row by row, from the records (writes nothing)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes sharing the device (claim tasks in priority order; merged at the end)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="start no new run after this many seconds (the rest waits for a later call)")
    parser.add_argument("--claims", default=None, help=argparse.SUPPRESS)  # set by --workers for its processes
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    if args.goals:
        print(goals_report(load_records(out)) or f"no row of {out} has both a baseline and a default record")
        return
    if not args.report:
        if args.workers > 1:
            run_workers(args, argv)
        else:
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
            run(args)
            if args.claims:
                return  # a worker of --workers: the parent merges and reports
    print(report(load_records(out), out.parent, out.stem))


if __name__ == "__main__":
    main()
