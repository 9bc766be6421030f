"""Recipe: pytorch-quantization (2.1.3) PTQ → CPT-V refinement → ONNX for TensorRT.

    python integrations/pytorch_quantization_onnx.py --bits W4A8 --preset fast --out model.onnx

``quant_modules.initialize()`` breaks timm ≥ 1.0 (its patched ``nn.Linear`` rejects ``device``/``dtype``), so
step 1 swaps the layers of the built model with ``cptv_plugin.quantize_pytorch_quantization`` and calibrates
them with pytorch-quantization's own ``MaxCalibrator``.
"""

from __future__ import annotations

import argparse

import cptv_plugin
from cptv_plugin.datasets import fashion_mnist_splits
from cptv_plugin.models import load_reference_model
from cptv_plugin.train import evaluate_top1


def run(bits: str = "W4A8", preset: str | cptv_plugin.SearchConfig = "fast", calibration: int = 1000,
        test_images: int = 10000, model_name: str = "fmnist_vit_tiny", out: str = "model.onnx") -> dict:
    model = load_reference_model(model_name)
    calib, test_x, test_y = fashion_mnist_splits(calibration, test_images)

    model = cptv_plugin.quantize_pytorch_quantization(model, bits, calib)            # 1. swap + calibrate
    before = evaluate_top1(model, test_x, test_y)
    config = cptv_plugin.SearchConfig.preset(preset)
    result = cptv_plugin.refine_pytorch_quantization(model, calib, config=config)  # 2. refine
    after = evaluate_top1(model, test_x, test_y)
    onnx_path = cptv_plugin.export_onnx(model, out, calib[:2])                       # 3. ONNX for TensorRT
    return {"bits": bits, "preset": config.name, "top1_before": before, "top1_after": after,
            **result.figures(),
            "onnx": str(onnx_path), "tensorrt_violations": cptv_plugin.check_tensorrt_onnx(onnx_path)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", default="W4A8")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--calibration", type=int, default=1000)
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--out", default="model.onnx")
    args = parser.parse_args()
    print(run(args.bits, args.preset, args.calibration, args.test_images, out=args.out))
