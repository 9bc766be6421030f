"""Seconds of the gradient stage alone on the CI ViT (``fmnist_vit_tiny``, 200 calibration images): torch.ao FX
with every op quantized (W3A8) and ModelOpt's linear placement (W2A8), ``--steps`` steps, each stage ``--repeat``
times from the same scales (the first includes warm-up). Prints one line per stage with its checks.

    python -m benchmarks.profile_stage --steps 40 --repeat 3
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from benchmarks.scale_sensitivity import ci_vit, fx_session
from cptv_plugin.gradient import gradient_refine


def time_stages(session, name: str, batches, reference, steps: int, repeat: int) -> list[float]:
    handles = session.all_handles
    given = [h.read().clone() for h in handles]
    seconds = []
    for attempt in range(repeat):
        for handle, value in zip(handles, given):
            handle.set(value)
        start = time.perf_counter()
        record = gradient_refine(handles, session.chain.forward, batches, reference, steps=steps, lr=0.01, checks=2)
        seconds.append(time.perf_counter() - start)
        print(f"{name:<22} run {attempt}: {seconds[-1]:6.2f} s  checks {[c['loss'] for c in record['history']]}",
              flush=True)
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    model, calib, batches, reference = ci_vit(args.device)
    time_stages(fx_session(model, calib, "W3A8", args.device), "torch.ao FX e2e W3A8", batches, reference,
                args.steps, args.repeat)
    try:
        from cptv_plugin.amax.modelopt import modelopt_kind
        from cptv_plugin.amax.session import AmaxSession
        from benchmarks.accuracy import quantize_linear
    except ImportError as error:  # ModelOpt not installed
        print(f"ModelOpt skipped: {error}")
        return
    quantized = quantize_linear(copy.deepcopy(model), calib.to(args.device), "W2A8", "baseline")
    time_stages(AmaxSession(quantized, modelopt_kind()), "ModelOpt linear W2A8", batches, reference, args.steps,
                args.repeat)


if __name__ == "__main__":
    main()
