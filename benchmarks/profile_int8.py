"""Would int8 tensor-core matmuls make a candidate's evaluation cheaper? (a diagnostic for the speed issue)

The search evaluates W4A8 candidates by simulating the quantization: each Linear's input and weight are fake
quantized and multiplied in bf16. TensorRT multiplies the same integers in int8 with int32 accumulation, which an
H100 runs at twice bf16's peak. This times one forward of 1,000 images through a timm model whose Linear layers are
quantized as ModelOpt's default placement does (input per tensor at 8 bits, weight per output channel at 4 bits;
the fake quantization re-done at every forward, as a candidate's new scales need), compiled, two ways:

- ``simulated``: fake quantize input and weight (fp32 arithmetic, as ``integer_fake_quant``), matmul in bf16;
- ``int8``: round input and weight to int8, ``torch._int_mm`` (int32 accumulation), rescale in fp32.

and, for scale, the model unquantized in bf16. It also prints how far the two quantized forwards' logits lie apart
and from the simulated forward in fp32 (which is what the integer arithmetic computes exactly, up to fp32 sums).

    python -m benchmarks.profile_int8 [--models deit_tiny_patch16_224 ...] [--images 1000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import timm
import torch
import torch.nn.functional as F
from torch import nn

from cptv_plugin._io import atomic_path
from cptv_plugin.amax.session import _integer_fake_quant

WEIGHT_MAX, INPUT_MAX = 7.0, 127.0  # signed 4-bit and 8-bit maxbounds (ModelOpt: amax / maxbound is the step)


class QuantizedLinear(nn.Module):
    """A Linear whose input (per tensor, 8 bits) and weight (per output channel, 4 bits) are quantized."""

    def __init__(self, linear: nn.Linear, int8: bool):
        super().__init__()
        self.weight, self.bias, self.int8 = linear.weight, linear.bias, int8
        self.register_buffer("input_amax", torch.zeros(()))
        self.register_buffer("weight_amax", linear.weight.detach().abs().amax(1, keepdim=True).clamp_min(1e-8))
        self.calibrating = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.input_amax = torch.maximum(self.input_amax, x.detach().abs().amax().float())
            return F.linear(x, self.weight, self.bias)
        if not self.int8:  # the library's fake quantization, as the search's compiled segments run it
            return F.linear(_integer_fake_quant(x, self.input_amax, -INPUT_MAX - 1, INPUT_MAX),
                            _integer_fake_quant(self.weight, self.weight_amax, -WEIGHT_MAX - 1, WEIGHT_MAX).to(x.dtype),
                            self.bias)
        # the same levels (``_integer_fake_quant``'s arithmetic: a true division for the step), kept as integers
        input_step, weight_step = INPUT_MAX / self.input_amax, WEIGHT_MAX / self.weight_amax
        input_levels = torch.round(x.float() * input_step).clamp(-INPUT_MAX - 1, INPUT_MAX)
        weight_levels = torch.round(self.weight.float() * weight_step).clamp(-WEIGHT_MAX - 1, WEIGHT_MAX)
        rows = input_levels.to(torch.int8).reshape(-1, x.shape[-1])
        product = torch._int_mm(rows, weight_levels.to(torch.int8).t())
        output = product.float() / (input_step * weight_step.reshape(1, -1))
        if self.bias is not None:
            output = output + self.bias.float()
        return output.to(x.dtype).reshape(*x.shape[:-1], -1)


def quantized_model(name: str, calibration: torch.Tensor, int8: bool) -> nn.Module:
    """timm's ``name`` (random weights, seed 0) with every Linear quantized, calibrated by MinMax on ``calibration``."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval().to(calibration.device)
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                setattr(parent, child_name, QuantizedLinear(child, int8))
    with torch.no_grad():
        model(calibration)
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.calibrating = False
    return model


def time_forward(forward, images: torch.Tensor, repeats: int) -> float:
    """Mean seconds of one forward of ``images`` (compiled and warmed up first)."""
    with torch.no_grad():
        for _ in range(2):
            forward(images)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            forward(images)
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def profile(name: str, images: int, repeats: int) -> dict:
    torch.manual_seed(1)
    batch = torch.randn(images, 3, 224, 224, device="cuda")
    calibration = batch[:64]
    record = {"model": name, "images": images, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    logits = {}
    for variant in ("plain", "simulated", "int8"):
        torch._dynamo.reset()
        if variant == "plain":
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False).eval().cuda()
        else:
            model = quantized_model(name, calibration, int8=variant == "int8")
        compiled = torch.compile(model)

        def forward(x, compiled=compiled):
            with torch.autocast("cuda", torch.bfloat16):
                return compiled(x)

        start = time.perf_counter()
        with torch.no_grad():
            forward(batch[:100])
        record[f"{variant}_compile_seconds"] = round(time.perf_counter() - start, 1)
        record[f"{variant}_seconds"] = round(time_forward(forward, batch, repeats), 5)
        with torch.no_grad():
            logits[variant] = forward(batch[:100]).float()
            if variant == "simulated":
                logits["simulated_fp32"] = model(batch[:100]).float()  # eager, fp32: the exact arithmetic
        del model, compiled
        torch.cuda.empty_cache()
    exact = logits["simulated_fp32"]
    for variant in ("simulated", "int8"):
        record[f"{variant}_max_abs_logit_error"] = round(float((logits[variant] - exact).abs().max()), 5)
        record[f"{variant}_top1_agreement"] = float((logits[variant].argmax(1) == exact.argmax(1)).float().mean())
    record["int8_saving"] = round(1 - record["int8_seconds"] / record["simulated_seconds"], 3)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["deit_tiny_patch16_224", "deit_small_patch16_224",
                                                        "vit_base_patch16_224", "swin_tiny_patch4_window7_224"])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this diagnostic times CUDA kernels; run it on a machine with a CUDA GPU")
    records = []
    for name in args.models:
        records.append(profile(name, args.images, args.repeats))
        print(json.dumps(records[-1]), flush=True)
        if args.out:  # after each model: a call cut short keeps the models it finished
            with atomic_path(args.out) as path, open(path, "w") as handle:
                json.dump(records, handle, indent=1)


if __name__ == "__main__":
    main()
