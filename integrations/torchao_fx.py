"""Recipe: torch.ao FX post-training quantization → CPT-V refinement → convert_fx.

    python integrations/torchao_fx.py --bits W3A8 --preset fast

Every step but ``refine_fx`` is the standard torch.ao FX flow; the refined scales travel into the converted
model through the prepared GraphModule.
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import cptv_plugin
from cptv_plugin.datasets import fashion_mnist_splits
from cptv_plugin.models import load_reference_model
from cptv_plugin.qconfigs import fx_qconfig_mapping, prepare_timm_for_fx
from cptv_plugin.train import evaluate_top1


def run(bits: str = "W3A8", preset: str | cptv_plugin.SearchConfig = "fast", calibration: int = 1000,
        test_images: int = 10000, model_name: str = "fmnist_vit_tiny") -> dict:
    warnings.simplefilter("ignore", DeprecationWarning)
    model = prepare_timm_for_fx(load_reference_model(model_name))      # expose softmax to FX tracing
    calib, test_x, test_y = fashion_mnist_splits(calibration, test_images)

    prepared = prepare_fx(model, fx_qconfig_mapping(bits), example_inputs=(calib[:1],))   # 1. prepare
    with torch.no_grad():                                                                 # 2. calibrate
        for batch in calib.split(100):
            prepared(batch)
    before = evaluate_top1(convert_fx(copy.deepcopy(prepared)), test_x, test_y)
    config = cptv_plugin.SearchConfig.preset(preset)
    result = cptv_plugin.refine_fx(prepared, calib, config=config)  # 3. refine
    quantized = convert_fx(prepared)                                                      # 4. convert
    after = evaluate_top1(quantized, test_x, test_y)
    return {"bits": bits, "preset": config.name, "top1_before": before, "top1_after": after,
            **result.figures()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", default="W3A8")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--calibration", type=int, default=1000)
    parser.add_argument("--test-images", type=int, default=10000)
    args = parser.parse_args()
    print(run(args.bits, args.preset, args.calibration, args.test_images))
