"""Recipe: one CPT-V refinement shared by several GPUs (torchrun), after torch.ao FX post-training quantization.

    torchrun --standalone --nproc-per-node 2 integrations/torchrun_multi_gpu.py --bits W3A8 --preset fast

Every rank runs this same script: the same PTQ on the same calibration images, then the same ``refine_fx`` call with
the model on its own GPU. cptv_plugin shares each candidate's evaluation out by calibration batch and sums the
fitness over the ranks, so every rank commits the scales one process would have found (``SearchConfig.distributed``;
the gradient stage runs whole on every rank). Rank 0 evaluates, saves and reports. Without GPUs it runs on the CPU
with the gloo backend (``--device cpu``). Any other integration (ModelOpt, pytorch-quantization, PT2E) shares out the
same way: initialize the process group, put each rank's model on its device, call ``refine_*`` on every rank.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import warnings

import torch
import torch.distributed as dist
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import cptv_plugin
from cptv_plugin.datasets import fashion_mnist_splits
from cptv_plugin.models import load_reference_model
from cptv_plugin.qconfigs import fx_qconfig_mapping, prepare_timm_for_fx
from cptv_plugin.train import evaluate_top1


def run(bits: str = "W3A8", preset: str | cptv_plugin.SearchConfig = "fast", calibration: int = 1000,
        test_images: int = 10000, model_name: str = "fmnist_vit_tiny", device: str | None = None,
        out: str | None = None) -> dict | None:
    """The whole flow on this rank (the process group initialized by the caller); rank 0's report, else ``None``."""
    warnings.simplefilter("ignore", DeprecationWarning)
    rank = dist.get_rank()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"  # torchrun's local rank: one GPU per process
    model = prepare_timm_for_fx(load_reference_model(model_name))
    calib, test_x, test_y = fashion_mnist_splits(calibration, test_images)  # every rank: the same images
    prepared = prepare_fx(model, fx_qconfig_mapping(bits), example_inputs=(calib[:1],))   # 1. prepare
    with torch.no_grad():                                                                 # 2. calibrate
        for batch in calib.split(100):
            prepared(batch)
    before = evaluate_top1(convert_fx(copy.deepcopy(prepared)), test_x, test_y) if rank == 0 else None
    prepared.to(device)
    config = cptv_plugin.SearchConfig.preset(preset)
    result = cptv_plugin.refine_fx(prepared, calib.to(device), config=config)             # 3. refine, every rank
    if rank != 0:
        return None
    quantized = convert_fx(prepared.cpu())                                                # 4. convert
    after = evaluate_top1(quantized, test_x, test_y)
    if out:
        torch.save(quantized.state_dict(), out)                                           # 5. save (rank 0)
    return {"bits": bits, "preset": config.name, "ranks": result.ranks, "device": result.device,
            "top1_before": before, "top1_after": after, **result.figures()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", default="W3A8")
    parser.add_argument("--preset", default="fast", help="default, paper or fast")
    parser.add_argument("--model", default="fmnist_vit_tiny")
    parser.add_argument("--calibration", type=int, default=1000)
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (each rank its own GPU: cuda:LOCAL_RANK), cpu, or one device for every rank")
    parser.add_argument("--backend", help="torch.distributed backend (default: nccl on CUDA, gloo on the CPU)")
    parser.add_argument("--passes", type=int, help="override the preset's number of passes")
    parser.add_argument("--gradient-steps", type=int, help="override the preset's gradient stage (0: none)")
    parser.add_argument("--out", help="save the converted model's state_dict here (rank 0)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("passes", args.passes), ("gradient_steps", args.gradient_steps)) if v is not None}
    if args.device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) if args.device == "cuda" else args.device)
    dist.init_process_group(args.backend or ("nccl" if args.device.startswith("cuda") else "gloo"))
    try:
        report = run(args.bits, cptv_plugin.SearchConfig.preset(args.preset, **overrides), args.calibration,
                     args.test_images, args.model, args.device, args.out)
        if report is not None:
            print(json.dumps(report))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
