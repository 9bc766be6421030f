"""The ModelOpt checkpoint step as a user runs it: ``mto.save`` → ``cptv refine-modelopt`` → ``mto.restore``.

    python -m benchmarks.modelopt_checkpoint [--device cuda] [--out benchmarks/results/modelopt_checkpoint.json]

Each case quantizes a model with ModelOpt's default placement and ``max`` calibration, saves it with ``mto.save``,
runs the command line (``python -m cptv_plugin.cli refine-modelopt``, a process of its own, as a user would) on
``--device``, then restores the written checkpoint on the CPU and records: the command's wall time, whether the
input file is byte for byte unchanged, how many ``amax`` the refinement changed, whether every restored tensor
is on the CPU, and, for the Fashion-MNIST reference models, top-1 on the test set before and after.

Cases (``--cases MODEL:BITS:PRESET``): by default the three reference models at W2A8 with the default preset
(``cptv:`` constructors, Fashion-MNIST calibration). Any other name is a timm model with random weights at 224²,
calibrated from a tensor file of random images: only the time and the round trip mean anything there (and the
lossless check may leave a random model alone). The file is rewritten after every case.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cptv_plugin._io import atomic_path
from cptv_plugin.models import build_model, list_reference_models

CASES = ["fmnist_deit_tiny:W2A8:default", "fmnist_swin_tiny:W2A8:default", "fmnist_levit:W2A8:default"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _amax(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {name: module.amax.detach().cpu().clone() for name, module in model.named_modules()
            if isinstance(module, TensorQuantizer) and getattr(module, "amax", None) is not None}


def run_case(case: str, device: str, workdir: Path, calibration_size: int) -> dict:
    """Quantize, save, refine through the command line, restore on the CPU; one record."""
    import modelopt.torch.opt as mto
    import modelopt.torch.quantization as mtq

    from cptv_plugin.datasets import fashion_mnist_splits
    from cptv_plugin.qconfigs import modelopt_config
    from cptv_plugin.train import evaluate_top1

    name, bits, preset = case.split(":")
    reference = name in list_reference_models()
    spec = f"cptv:{name}" if reference else f"timm:{name}"
    quantized = build_model(spec).eval().to(device)
    if reference:
        calibration, test_x, test_y = fashion_mnist_splits(calibration_size, seed=1)
        calibration_source = "fashion-mnist"
    else:
        generator = torch.Generator().manual_seed(0)
        calibration = torch.randn(calibration_size, 3, 224, 224, generator=generator)
        calibration_source = str(workdir / f"{name}_images.pt")
        torch.save(calibration, calibration_source)

    def forward_loop(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for batch in calibration.split(100):
                model(batch.to(device))

    quantized = mtq.quantize(quantized, modelopt_config(bits, "max"), forward_loop)
    checkpoint, output = workdir / f"{name}_{bits}.pth", workdir / f"{name}_{bits}_refined.pth"
    mto.save(quantized, str(checkpoint))
    record = {"model": name, "bits": bits, "preset": preset, "device": device,
              "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "calibration_images": calibration_size}
    if reference:
        record["top1_before"] = round(evaluate_top1(quantized, test_x.to(device), test_y), 2)
    before_digest, before_amax = _digest(checkpoint), _amax(quantized)
    command = [sys.executable, "-m", "cptv_plugin.cli", "refine-modelopt", str(checkpoint), "--model", spec,
               "--calibration", calibration_source, "--calibration-size", str(calibration_size), "--out",
               str(output), "--preset", preset, "--device", device]
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    record["command_seconds"] = round(time.perf_counter() - start, 1)
    if completed.returncode != 0:
        record["error"] = completed.stderr[-3000:]
        return record
    lines = completed.stdout.strip().splitlines()  # ModelOpt prints too; the command ends "RESULT\nwrote OUT"
    record["command_summary"] = lines[-2] if len(lines) > 1 and lines[-1].startswith("wrote ") else lines[-1:]
    record["input_unchanged"] = _digest(checkpoint) == before_digest
    restored = mto.restore(build_model(spec).eval(), str(output))
    after_amax = _amax(restored)
    record["amax_total"] = len(before_amax)
    record["amax_changed"] = sum(not torch.equal(before_amax[key], after_amax[key].to(before_amax[key].dtype))
                                 for key in before_amax)
    record["restored_on_cpu"] = all(t.device.type == "cpu" for t in restored.state_dict().values()
                                    if isinstance(t, torch.Tensor))
    if reference:
        record["top1_after"] = round(evaluate_top1(restored, test_x, test_y), 2)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=CASES, help="MODEL:BITS:PRESET")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calibration-size", type=int, default=1000)
    parser.add_argument("--out", default="benchmarks/results/modelopt_checkpoint.json")
    args = parser.parse_args()
    records = []
    with tempfile.TemporaryDirectory() as workdir:
        for case in args.cases:
            records.append(run_case(case, args.device, Path(workdir), args.calibration_size))
            print(json.dumps(records[-1]), flush=True)
            with atomic_path(args.out) as temporary:
                temporary.write_text(json.dumps({"records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
