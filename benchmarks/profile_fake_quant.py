"""How fast the compiled fake quantization and its neighbours run against the memory bandwidth (a diagnostic for
the speed issue): each elementwise op of a quantized MLP/LayerNorm, compiled alone, on one tensor of the size the
first stage of Swin-T gives 1,000 images (3,136 tokens × 384 features, bf16).

    python -m benchmarks.profile_fake_quant [--out FILE]

A plain copy (read once, write once) is the bandwidth bound; an op at the copy's time costs nothing more than the
bytes it moves. The fake quantization is the library's own (``integer_fake_quant``'s arithmetic, a true division
as the frameworks compute it).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from cptv_plugin._io import atomic_path
from cptv_plugin.amax.session import _integer_fake_quant


def _fake_quant(tensor: torch.Tensor) -> torch.Tensor:
    return _integer_fake_quant(tensor, torch.tensor(3.0, device=tensor.device), -128.0, 127.0)


VARIANTS = {
    "copy": lambda t: t * 2,
    "fake_quant": _fake_quant,
    "gelu_erf": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "gelu_erf+fake_quant": lambda t: _fake_quant(F.gelu(t)),
    "layer_norm": lambda t: F.layer_norm(t, t.shape[-1:]),
    "layer_norm+fake_quant": lambda t: _fake_quant(F.layer_norm(t, t.shape[-1:])),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000 * 3136)
    parser.add_argument("--features", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this diagnostic times CUDA kernels; run it on a machine with a CUDA GPU")
    torch.manual_seed(0)
    tensor = torch.randn(args.rows, args.features, device="cuda", dtype=torch.bfloat16)
    moved = tensor.numel() * tensor.element_size() * 2  # read once, write once
    records = []
    for name, fn in VARIANTS.items():
        compiled = torch.compile(fn, dynamic=False)
        compiled(tensor)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.repeats):
            compiled(tensor)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / args.repeats
        records.append({"op": name, "ms": round(ms, 3), "tb_per_s": round(moved / ms / 1e9, 2),
                        "shape": list(tensor.shape), "dtype": "bf16", "device": torch.cuda.get_device_name(),
                        "torch": torch.__version__})
        print(json.dumps(records[-1]), flush=True)
    if args.out:
        with atomic_path(args.out) as temporary:
            temporary.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
