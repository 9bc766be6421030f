"""Swin-T's window attention: timm's default unfused path against its fused one (``WindowAttention.fused_attn``:
``scaled_dot_product_attention`` with the relative-position bias and shift mask as ``attn_mask``), a diagnostic for
the speed issue (softmax and bmm were 28 % of a Swin-T evaluation's kernel time: FINDINGS section 23).

    python -m benchmarks.profile_attention [--images 1000] [--out FILE]

Times a whole Swin-T forward (random weights, 224², bf16 autocast, TF32 on) eager and compiled, both paths, and
prints how far each output is from the unfused eager one and from fp32. Measured on an H200 (FINDINGS section 24)
the fused path is 23 % slower compiled, so the engine keeps the model's own attention.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cptv_plugin._io import atomic_path


def _set_fused(model: torch.nn.Module, fused: bool) -> None:
    from timm.models.swin_transformer import WindowAttention

    for module in model.modules():
        if isinstance(module, WindowAttention):
            module.fused_attn = fused


def _time_ms(fn, images: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        out = fn(images)  # warm-up (and compile)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn(images)
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1000, out.float()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this diagnostic times CUDA kernels; run it on a machine with a CUDA GPU")
    import timm

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).cuda().eval()
    images = torch.randn(args.images, 3, 224, 224, device="cuda")
    records, outputs = [], {}
    for mode in ("eager", "compiled"):
        for fused in (False, True):
            _set_fused(model, fused)
            torch._dynamo.reset()
            fn = torch.compile(model, dynamic=False) if mode == "compiled" else model
            start = time.perf_counter()
            ms, outputs[mode, fused] = _time_ms(fn, images, args.repeats)
            records.append({"mode": mode, "fused_attn": fused, "ms_per_forward": round(ms, 1),
                            "seconds_with_warm_up": round(time.perf_counter() - start, 1)})
            print(f"{mode} fused={fused} {ms:.1f} ms ({records[-1]['seconds_with_warm_up']} s with warm-up)",
                  flush=True)
    _set_fused(model, False)
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        fp32 = model(images).float()
    unfused = outputs["eager", False]
    for record, out in zip(records, outputs.values()):
        record.update(max_abs_diff_to_unfused=round((out - unfused).abs().max().item(), 4),
                      max_abs_diff_to_fp32=round((out - fp32).abs().max().item(), 4),
                      top1_agreement_with_fp32=round((out.argmax(1) == fp32.argmax(1)).float().mean().item(), 4))
        print(record, flush=True)
    if args.out:
        with atomic_path(args.out) as path:
            path.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "timm": timm.__version__, "images": args.images, "records": records},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
