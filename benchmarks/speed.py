"""Speed of the search engine: our fast engine against a literal reference implementation, same run.

    python -m benchmarks.speed [--models vit_base_patch16_224 deit_tiny_patch16_224 ...] [--out FILE]

For each timm model at 224² (``--image-size``: smaller only for a smoke test; random weights: only time is
measured), PTQ at W4A8 on 1,000 random calibration images (``--framework fx``: torch.ao FX, every op;
``modelopt``: NVIDIA ModelOpt's default placement, Linear/Conv inputs and weights), then the paper preset (K=10,
P=15, C=3, S=10):

* ``fast``: our engine (block inputs cached once per visit, candidates run only the suffix, forward passes of
  1,000 images, the precision given by ``--precision``, default bf16 autocast on CUDA);
* ``literal``: a full forward per candidate, fp32, one fitness batch of 100 at a time. Its cost per evaluation
  is constant, so it is timed on a measured number of evaluations and extrapolated to the fast run's count
  (``extrapolated_from`` says how many were timed).

Records (``benchmarks/results/speed.json``): model, framework, engine, seconds, evaluations, device, peak_memory_gb,
precision, and for the fast engine the achieved fraction of the GPU's dense bf16 matmul peak
(``matmul_tflops`` / ``bf16_peak_tflops``), counting the matmul FLOPs of every evaluated suffix.
With ``--compile`` the fast records also give ``compile_phases_seconds``: torch.compile's time per phase (dynamo's
tracing, AOT autograd, inductor's lowering, code generation and kernel compiles), summed over the graphs compiled.

Under ``torchrun --nproc-per-node N -m benchmarks.speed ...`` the fast search is shared by N GPUs (one per rank,
``SearchConfig.distributed``): its record says ``ranks`` and its fraction of the bf16 peak is of N GPUs' peak; the
literal reference still runs on one GPU (rank 0), so ``speedup_of_fast`` is N GPUs against one.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
import warnings
from pathlib import Path

import torch

from cptv_plugin._io import atomic_path

MODELS = ["vit_base_patch16_224", "deit_small_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
          "levit_256"]
# dense bf16 tensor-core peaks (NVIDIA data sheets); used only for the achieved-fraction figure
BF16_PEAK_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H200": 989.0, "A100": 312.0}


def _peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in device_name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _segment_flops(chain, images: torch.Tensor) -> list[float]:
    """Matmul/conv FLOPs of each segment for ``images`` (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    env = chain.initial_env(images)
    flops = []
    for index in range(len(chain.segments)):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            next_env = chain.run(env, index, index + 1)
        flops.append(float(counter.get_total_flops()))
        env = next_env if isinstance(next_env, dict) else env
    return flops


def _search_seconds(result) -> float:
    """The evolutionary search's own seconds: its last visit's time since the search began (RefineResult.seconds
    counts the whole refinement since session 18)."""
    return round(result.history[-1]["seconds"], 2) if result.history else 0.0


def _first_pass_excess(history: list[dict]) -> float | None:
    ends: dict[int, float] = {}
    for record in history:
        ends[record["pass"]] = record["seconds"]
    durations = [ends[p] - ends.get(p - 1, 0.0) for p in sorted(ends)]
    if len(durations) < 2:
        return None
    return round(durations[0] - sum(durations[1:]) / (len(durations) - 1), 2)


# torch.compile's phases as dynamo times them (torch._dynamo.utils.compilation_time_metrics, seconds summed over the
# graphs compiled): tracing, AOT autograd, inductor's lowering and code generation, and the kernel compiles
COMPILE_PHASES = ("_compile.compile_inner", "bytecode_tracing", "aot_collect_metadata",
                  "_recursive_joint_graph_passes", "GraphLowering.run", "GraphLowering.codegen",
                  "PyCodeCache.load_by_key_path", "async_compile.precompile", "async_compile.wait")


def _compile_phases(metrics) -> dict[str, float]:
    """Seconds per compile phase from dynamo's metrics (name -> one duration per compiled graph); phases this torch
    does not time are left out (the names are torch's own and change between versions)."""
    return {phase: round(sum(metrics[phase]), 2) for phase in COMPILE_PHASES if metrics.get(phase)}


def _compile_metrics():
    """Dynamo's (private) compile-time table, or an empty dict where this torch has none."""
    return getattr(getattr(torch._dynamo, "utils", None), "compilation_time_metrics", {})


def _quantized(model: torch.nn.Module, calib: torch.Tensor, framework: str, bits: str):
    """(quantized model, its refine function, a session factory for an evaluation copy) for ``framework``."""
    import cptv_plugin

    @torch.no_grad()
    def calibrate(module):
        for batch in calib.split(100):
            module(batch)

    if framework == "modelopt":  # ModelOpt quantizes Linear inputs: timm's fused attention stays as the user has it
        import modelopt.torch.quantization as mtq

        from cptv_plugin.amax.modelopt import modelopt_kind
        from cptv_plugin.amax.session import AmaxSession
        from cptv_plugin.qconfigs import modelopt_config

        quantized = mtq.quantize(model, modelopt_config(bits), calibrate)
        return quantized, cptv_plugin.refine_modelopt, lambda m: AmaxSession(m, modelopt_kind(),
                                                                              search_outside_blocks=False)
    from torch.ao.quantization.quantize_fx import prepare_fx

    from cptv_plugin.fx.refine import FxSession
    from cptv_plugin.qconfigs import fx_qconfig_mapping, prepare_timm_for_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(prepare_timm_for_fx(model), fx_qconfig_mapping(bits), example_inputs=(calib[:1],))
    calibrate(prepared)
    return prepared, cptv_plugin.refine_fx, lambda m: FxSession(m, search_outside_blocks=False)


def bench_model(name: str, device: torch.device, images: int, precision: str, literal_evaluations: int,
                bits: str = "W4A8", passes: int = 10, compile: bool = False, framework: str = "fx",
                warm: bool = False, batch_size: int = 100, rank: int = 0, world: int = 1,
                image_size: int = 224) -> list[dict]:
    """The records of one model (on ranks other than 0: none; they only share the fast search)."""
    import timm

    import cptv_plugin
    from cptv_plugin.refinement import _device_name

    torch.manual_seed(0)
    size = {} if image_size == 224 else {"img_size": image_size}  # the model's own default otherwise
    model = timm.create_model(name, pretrained=False, **size).eval().to(device)
    calib = torch.randn(images, 3, image_size, image_size, device=device)
    prepared, refine, session_of = _quantized(model, calib, framework, bits)
    literal_model = copy.deepcopy(prepared)
    device_name = _device_name(device)
    records = []

    config = cptv_plugin.SearchConfig.paper(progress=False, precision=precision, passes=passes, compile=compile,
                                            batch_size=min(batch_size, images))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    _compile_metrics().clear()
    _sync(device)
    start = time.perf_counter()
    result = refine(prepared, calib, config=config)
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    # matmul FLOPs actually evaluated: every candidate of a visit re-runs the segments from its group's on
    session = session_of(copy.deepcopy(literal_model).requires_grad_(False))
    flops = _segment_flops(session.chain, calib[:10])
    per_image = [f / 10 for f in flops]
    suffix = [sum(per_image[s:]) for s in range(len(per_image))]
    visits = config.passes * len(session.groups)
    evaluated = images * (suffix[0] + sum(suffix[g.segment] for g in session.groups) * config.passes
                          * (config.population - 1 + config.cycles))
    tflops = evaluated / seconds / 1e12
    peak_tflops = _peak_tflops(device_name)
    peak_tflops = peak_tflops and peak_tflops * world  # every rank's GPU
    records.append({
        "model": name, "framework": framework, "engine": "fast", "compiled": result.compiled, "bits": bits,
        "preset": "paper", "images": images, "image_size": image_size,
        # seconds: the whole refine call; search_seconds: its search alone (the rest: references, the start
        # check and compiling, which happens on the start check's forward pass)
        "seconds": round(seconds, 2), "search_seconds": _search_seconds(result),
        "evaluations": result.evaluations, "group_visits": visits,
        "device": device_name, "precision": result.precision, "peak_memory_gb": peak and round(peak, 2),
        "fitness": [round(result.initial_fitness, 5), round(result.final_fitness, 5)],
        # the first pass pays for compilation: its excess over the mean of the other passes
        "first_pass_excess_seconds": _first_pass_excess(result.history),
        "matmul_tflops": round(tflops, 1), "bf16_peak_tflops": peak_tflops,
        "fraction_of_bf16_peak": peak_tflops and round(tflops / peak_tflops, 3),
    })
    if world > 1:
        records[-1]["ranks"] = world
    if compile:  # where the compile time went (FINDINGS section 24: no single phase dominates)
        records[-1]["compile_phases_seconds"] = _compile_phases(_compile_metrics())
    logging.info("%s fast: %.1f s, %d evaluations, %s", name, seconds, result.evaluations, records[-1])
    if warm:  # the same search again: what a user's next refinement of this model costs
        records[-1]["inductor_cache"] = "cold"
        torch._dynamo.reset()  # dynamo traces again; inductor's on-disk graph and kernel caches are warm
        _compile_metrics().clear()
        again = copy.deepcopy(literal_model)
        _sync(device)
        start = time.perf_counter()
        repeated = refine(again, calib, config=config)
        _sync(device)
        warm_seconds = time.perf_counter() - start
        warm_tflops = evaluated / warm_seconds / 1e12
        records.append({**records[-1], "seconds": round(warm_seconds, 2), "search_seconds": _search_seconds(repeated),
                        "inductor_cache": "warm",
                        "fitness": [round(repeated.initial_fitness, 5), round(repeated.final_fitness, 5)],
                        "matmul_tflops": round(warm_tflops, 1),
                        "fraction_of_bf16_peak": peak_tflops and round(warm_tflops / peak_tflops, 3)})
        if compile:
            records[-1]["compile_phases_seconds"] = _compile_phases(_compile_metrics())
        del again
    if rank != 0:
        return []

    # literal: full forward per candidate, fp32, batches of 100; time a measured number of evaluations
    from cptv_plugin.engine import Evaluator, reference_outputs

    session = session_of(literal_model)
    batches = list(calib.split(config.batch_size))
    session.set_quantization(False)
    reference = reference_outputs(session.chain.forward, batches)
    session.set_quantization(True)
    evaluator = Evaluator(session.chain, batches, reference, "infonce", config.temperature, config.normalize,
                          precision="fp32")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    evaluator(None)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(literal_evaluations):
        evaluator(None)
    _sync(device)
    per_evaluation = (time.perf_counter() - start) / literal_evaluations
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    literal_seconds = per_evaluation * result.evaluations
    records.append({
        "model": name, "framework": framework, "engine": "literal", "bits": bits, "preset": "paper",
        "images": images, "image_size": image_size,
        "seconds": round(literal_seconds, 2), "evaluations": result.evaluations, "device": device_name,
        "precision": "fp32", "peak_memory_gb": peak and round(peak, 2),
        "extrapolated_from": f"{literal_evaluations} full-forward evaluations timed, {per_evaluation:.4f} s each",
        "speedup_of_fast": round(literal_seconds / seconds, 1),
    })
    if world > 1:  # one GPU's literal run, the reference of this run's N-GPU fast one
        records[-1]["ranks"] = world
    logging.info("%s literal: %.1f s (extrapolated)", name, literal_seconds)
    del prepared, literal_model, session, evaluator
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--literal-evaluations", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile the evaluation segments")
    parser.add_argument("--framework", choices=["fx", "modelopt"], default="fx")
    parser.add_argument("--warm", action="store_true",
                        help="also time the same search a second time (inductor's on-disk caches warm)")
    parser.add_argument("--passes", type=int, default=10, help="K (the paper: 10; fewer only for a smoke test)")
    parser.add_argument("--batch-size", type=int, default=100, help="images per fitness batch (the paper: 100)")
    parser.add_argument("--image-size", type=int, default=224, help="image side (224; smaller only for a smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results/speed.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device(args.device)
    rank, world = 0, int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # launched by torchrun: every rank shares each fast search, rank 0 reports
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank = dist.get_rank()
    out = Path(args.out)
    records = json.loads(out.read_text()) if out.exists() else []
    for name in args.models:
        fresh = bench_model(name, device, args.images, args.precision, args.literal_evaluations, passes=args.passes,
                            compile=args.compile, framework=args.framework, warm=args.warm,
                            batch_size=args.batch_size, rank=rank, world=world, image_size=args.image_size)
        if rank != 0:
            continue
        records = [r for r in records if not (r["model"] == name and r["device"] == fresh[0]["device"]
                                              and r.get("ranks", 1) == world
                                              and r.get("framework", "fx") == args.framework
                                              and r.get("precision") in (fresh[0]["precision"], "fp32")
                                              and r["engine"] in ("fast", "literal")
                                              and r.get("images") == args.images
                                              and r.get("image_size", 224) == args.image_size)] + fresh
        with atomic_path(out) as temporary:
            temporary.write_text(json.dumps(records, indent=1))
        for record in fresh:
            print(json.dumps(record), flush=True)
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
