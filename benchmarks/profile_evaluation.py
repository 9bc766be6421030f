"""Where the time of one fitness evaluation goes (a diagnostic for the speed benchmark).

    python -m benchmarks.profile_evaluation --model deit_tiny_patch16_224 --images 1000
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch


def timed(label: str, fn, repeat: int = 3) -> float:
    fn()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    seconds = (time.perf_counter() - start) / repeat
    print(f"{label:<48} {seconds * 1000:9.1f} ms", flush=True)
    return seconds


def main(argv: list[str] | None = None) -> None:
    import timm
    from torch.ao.quantization.quantize_fx import prepare_fx

    from cptv_plugin.engine import Evaluator, reference_outputs
    from cptv_plugin.fx.refine import FxSession
    from cptv_plugin.qconfigs import fx_qconfig_mapping, prepare_timm_for_fx

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    start = time.perf_counter()
    model = prepare_timm_for_fx(timm.create_model(args.model, pretrained=False)).eval().to(device)
    calib = torch.randn(args.images, 3, 224, 224, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(model, fx_qconfig_mapping("W4A8"), example_inputs=(calib[:1],))
    with torch.no_grad():
        for batch in calib.split(100):
            prepared(batch)
    print(f"prepare + calibrate {time.perf_counter() - start:.1f} s", flush=True)
    with torch.no_grad():
        timed("plain fp32 forward (eager timm)", lambda: [model(b) for b in calib.split(250)])
        with torch.autocast(device.type, dtype=torch.bfloat16):
            timed("plain bf16 forward (eager timm)", lambda: [model(b) for b in calib.split(250)])
    start = time.perf_counter()
    session = FxSession(prepared, search_outside_blocks=False)
    print(f"session {time.perf_counter() - start:.1f} s, {len(session.chain.segments)} segments, "
          f"{len(session.simulated)} simulated quantizers", flush=True)
    batches = list(calib.split(100))
    session.set_quantization(False)
    reference = reference_outputs(session.chain.forward, batches)
    session.set_quantization(True)
    middle = session.groups[len(session.groups) // 2].segment
    for precision, compute in (("fp32", None), ("fp32", 1000), ("bf16", 1000), ("bf16", 250)):
        evaluator = Evaluator(session.chain, batches, reference, "infonce", 3.0, True, compute_batch_size=compute,
                              precision=precision)
        timed(f"full evaluation {precision} passes of {compute or 100}", lambda: evaluator(None))
        evaluator.prepare(middle)
        timed(f"suffix from segment {middle} {precision} passes of {compute or 100}", lambda: evaluator(middle))
    session.chain.compile()
    evaluator = Evaluator(session.chain, batches, reference, "infonce", 3.0, True, compute_batch_size=1000,
                          precision="bf16")
    start = time.perf_counter()
    evaluator(None)
    print(f"compile (first full evaluation) {time.perf_counter() - start:.1f} s", flush=True)
    timed("compiled full evaluation bf16 passes of 1000", lambda: evaluator(None))
    evaluator.prepare(middle)
    evaluator(middle)
    timed(f"compiled suffix from segment {middle} bf16", lambda: evaluator(middle))
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        evaluator = Evaluator(session.chain, batches, reference, "infonce", 3.0, True, compute_batch_size=1000,
                              precision="bf16")
        evaluator.prepare(middle)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            evaluator(middle)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=8), flush=True)


if __name__ == "__main__":
    main()
