"""Seconds of the gradient stage alone on the CI ViT (``fmnist_vit_tiny``, 200 calibration images): torch.ao FX
with every op quantized (W3A8) and ModelOpt's linear placement (W2A8), ``--steps`` steps, each stage ``--repeat``
times from the same scales (the first includes warm-up). Prints one line per stage with its checks.
``--op-by-op``: the learned fake quant differentiated op by op (the stage's fallback) instead of in closed form.
(Recorded at 720be8b, before the op-by-op path clamped with its own gradient, it showed what torch.clamp's
gradient at the range's bounds does: stage_gradient_convention_cpu.json, FINDINGS section 20.)

    python -m benchmarks.profile_stage --steps 40 --repeat 3 [--op-by-op] [--out records.json]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from benchmarks.scale_sensitivity import ci_vit, fx_session
from cptv_plugin.gradient import gradient_refine


def time_stages(session, name: str, batches, reference, steps: int, repeat: int) -> list[dict]:
    handles = session.all_handles
    given = [h.read().clone() for h in handles]
    records = []
    for attempt in range(repeat):
        for handle, value in zip(handles, given):
            handle.set(value)
        start = time.perf_counter()
        record = gradient_refine(handles, session.chain.forward, batches, reference, steps=steps, lr=0.01, checks=2)
        seconds = time.perf_counter() - start
        checks = [c["loss"] for c in record["history"]]
        print(f"{name:<22} run {attempt}: {seconds:6.2f} s  checks {checks}", flush=True)
        records.append({"stage": name, "run": attempt, "steps": steps, "seconds": round(seconds, 3),
                        "checks": checks})
    return records


def differentiate_op_by_op() -> None:
    """The stage's learned fake quant recorded op by op (``quantize`` None: its fallback for handles without a
    mask), as before the closed form."""
    from cptv_plugin import gradient

    original = gradient._LearnedFakeQuant.__init__

    def op_by_op(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.quantize = None
    gradient._LearnedFakeQuant.__init__ = op_by_op


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--op-by-op", action="store_true")
    parser.add_argument("--out", default=None, help="append the runs to this JSON file")
    args = parser.parse_args(argv)
    if args.op_by_op:
        differentiate_op_by_op()
    model, calib, batches, reference = ci_vit(args.device)
    records = time_stages(fx_session(model, calib, "W3A8", args.device), "torch.ao FX e2e W3A8", batches,
                          reference, args.steps, args.repeat)
    try:
        records += modelopt_stages(model, calib, batches, reference, args)
    finally:
        if args.out:  # appended, written atomically (the accuracy benchmark's record file helpers)
            from benchmarks.accuracy import load_records, save_records

            path = Path(args.out)
            gradients = "op by op" if args.op_by_op else "closed form"
            save_records(path, load_records(path) + [
                {**r, "gradients": gradients, "device": args.device, "torch": torch.__version__.split("+")[0]}
                for r in records])


def modelopt_stages(model, calib, batches, reference, args) -> list[dict]:
    try:
        from cptv_plugin.amax.modelopt import modelopt_kind
        from cptv_plugin.amax.session import AmaxSession
        from benchmarks.accuracy import quantize_linear
    except ImportError as error:  # ModelOpt not installed
        print(f"ModelOpt skipped: {error}")
        return []
    quantized = quantize_linear(copy.deepcopy(model), calib.to(args.device), "W2A8", "baseline")
    return time_stages(AmaxSession(quantized, modelopt_kind()), "ModelOpt linear W2A8", batches, reference,
                       args.steps, args.repeat)


if __name__ == "__main__":
    main()
