"""What torch.ao FX's second rounding of the scaled queries costs, and which simulation the lowered model matches.

    python -m benchmarks.scalar_multiply [--models fmnist_deit_tiny ...] [--bits W8A8 W4A4 ...] [--out FILE]

torch.ao gives a multiply by a Python number (attention's ``q * scale``; LeViT's ``(q @ k) * scale``) the observer
of its input, so its reference model and FakeQuantize round the product onto the input's grid, ``1 / scale``
times coarser than the product's range needs; ``convert_fx`` lowers the same multiply to torch's quantized multiply
by a scalar, which rescales exactly (scale × c, the same integers). For each reference model and bit setting, at
the accuracy benchmark's e2e placement (MinMax, every op quantized), on the first ``--test-images`` test images:

* ``reference``: ``convert_to_reference_fx``'s model (the product rounded again; the full dtype range);
* ``simulated``: the model the search and the accuracy benchmark evaluate (``FxSession`` at the benchmark's target:
  ``convert_fx`` at 8-bit activations, ``fake_quant`` below);
* ``multiply_exact``: the same simulation with the multiplies' qconfig None (``e2e-mulexact``);
* ``lowered``: ``convert_fx``'s model, at 8-bit activations (below, its kernels would use 256 levels anyway);

their top-1 and, against the lowered model, the share of test images with the same top-1 class.
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings

import torch

from cptv_plugin._io import atomic_path


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Percent of images with the same top-1 class."""
    return round((a.argmax(1) == b.argmax(1)).float().mean().item() * 100, 2)


def measure(model_name: str, bits: str, calib, test_x, test_y) -> dict:
    from torch.ao.quantization.quantize_fx import convert_fx, convert_to_reference_fx

    from benchmarks.accuracy import SCALED_QUERIES, evaluation_model, quantize_e2e
    from cptv_plugin.models import load_reference_model
    from cptv_plugin.qconfigs import parse_bits
    from cptv_plugin.train import predict_logits

    model = load_reference_model(model_name)
    prepared = quantize_e2e(model, calib, bits, "baseline")
    exact = quantize_e2e(model, calib, bits, "baseline", unquantized=SCALED_QUERIES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logits = {"fp32": predict_logits(model, test_x),
                  "reference": predict_logits(convert_to_reference_fx(copy.deepcopy(prepared)), test_x),
                  "simulated": predict_logits(evaluation_model(prepared, "e2e", bits), test_x),
                  "multiply_exact": predict_logits(evaluation_model(exact, "e2e", bits), test_x)}
        if parse_bits(bits)[1] == 8:
            logits["lowered"] = predict_logits(convert_fx(copy.deepcopy(prepared)), test_x)
    record = {"model": model_name, "bits": bits, "test_images": len(test_x),
              "scaled_multiplies": sum(node.target in SCALED_QUERIES for node in prepared.graph.nodes),
              "top1": {name: round((out.argmax(1) == test_y).float().mean().item() * 100, 2)
                       for name, out in logits.items()}}
    if "lowered" in logits:
        record["agreement_with_lowered"] = {name: agreement(logits[name], logits["lowered"])
                                            for name in ("reference", "simulated", "multiply_exact")}
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fmnist_deit_tiny", "fmnist_swin_tiny", "fmnist_levit"])
    parser.add_argument("--bits", nargs="+", default=["W8A8", "W4A8", "W4A4", "W3A4"])
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/experiments/scalar_multiply_cpu.json")
    args = parser.parse_args(argv)
    from cptv_plugin.datasets import fashion_mnist_splits

    torch.manual_seed(args.seed)
    calib, test_x, test_y = fashion_mnist_splits(1000, args.test_images, seed=args.seed)
    records = []
    for model_name in args.models:
        for bits in args.bits:
            records.append(measure(model_name, bits, calib, test_x, test_y))
            print(json.dumps(records[-1]), flush=True)
            with atomic_path(args.out) as temporary:
                temporary.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
