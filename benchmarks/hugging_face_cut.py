"""What cutting a Hugging Face model between its blocks by calling them saves, against running the whole model.

    python -m benchmarks.hugging_face_cut [--layers 8] [--width 96] [--images 1000] [--out FILE]

torch.fx cannot trace Hugging Face's ``ViTForImageClassification``; under ModelOpt and pytorch-quantization the
engine cuts it by calling its blocks one by one (``cptv_plugin.block_calls``), where before every candidate ran the
whole model. A random-weight ViT (``--width`` 96: 3 heads, MLP 4 × 96) on 28² single-channel images (patch 4: 50
tokens) is quantized by ModelOpt at W4A8 and refined twice from the same start, same seed: once cut, once with the
cut refused (the whole model per candidate). The ``fast`` preset without its gradient stage (and without its
lossless check, so that a small model is searched too), so that both run the same search; the records say whether
the refined scales are equal.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import time
from pathlib import Path
from unittest import mock

import torch

import cptv_plugin
from cptv_plugin import block_calls
from cptv_plugin._io import atomic_path


def hugging_face_vit(layers: int, width: int, image_size: int = 28, patch_size: int = 4):
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=image_size, patch_size=patch_size, num_channels=1, hidden_size=width,
                                    num_hidden_layers=layers, num_attention_heads=3, intermediate_size=4 * width,
                                    num_labels=10)
    return transformers.ViTForImageClassification(config).eval()


def refuse_cut(*args, **kwargs):
    raise block_calls.CutError("refused by the benchmark")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="cuda: the preset's GPU defaults (bf16, compiled segments)")
    parser.add_argument("--out", default="benchmarks/results/hugging_face_cut.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import modelopt.torch.quantization as mtq

    from cptv_plugin.qconfigs import modelopt_config

    size = args.image_size
    images = torch.randn(args.images, 1, size, size, generator=torch.Generator().manual_seed(1)).to(args.device)
    model = hugging_face_vit(args.layers, args.width, size, args.patch_size).to(args.device)
    quantized = mtq.quantize(model, modelopt_config("W4A8"), lambda m: m(images[:200]))
    with torch.no_grad():  # outside the timings: ModelOpt builds its CUDA extension on the first quantized forward
        quantized(images[:2])
    config = dataclasses.replace(cptv_plugin.SearchConfig.resolve("fast"), gradient_steps=0, feature_weight=0.0,
                                 lossless_kl=0.0, progress=False)  # a search even where the start is lossless
    models, records = {}, []
    for engine in ("cut", "whole"):
        model = models[engine] = copy.deepcopy(quantized)
        with mock.patch.object(block_calls, "cut_between_blocks", refuse_cut) if engine == "whole" else \
                contextlib.nullcontext():
            started = time.perf_counter()
            result = cptv_plugin.refine_modelopt(model, images, config=config)
            seconds = time.perf_counter() - started
        patch = f"_patch{args.patch_size}" if args.patch_size != 4 else ""
        name = f"hf_vit_{args.layers}x{args.width}_{size}px{patch}"
        records.append({"model": name, "framework": "modelopt", "bits": "W4A8",
                        "engine": engine, "seconds": round(seconds, 2), "evaluations": result.evaluations,
                        "final_fitness": result.final_fitness, "images": args.images,
                        "threads": torch.get_num_threads(), "device": result.device, "precision": result.precision,
                        "compiled": result.compiled, "torch": torch.__version__})
        print(json.dumps(records[-1]), flush=True)
    amax = [{n: q.amax for n, q in models[e].named_modules() if getattr(q, "amax", None) is not None}
            for e in ("cut", "whole")]
    same = all(torch.equal(a, amax[1][n]) for n, a in amax[0].items())
    for record in records:
        record["same_scales"] = same
        record["speedup_of_cut"] = round(records[1]["seconds"] / records[0]["seconds"], 2)
    print(f"same scales: {same}; cut {records[0]['seconds']} s, whole {records[1]['seconds']} s "
          f"({records[0]['speedup_of_cut']}x)")
    out = Path(args.out)
    existing = json.loads(out.read_text()) if out.exists() else []
    with atomic_path(out) as temporary:
        temporary.write_text(json.dumps(existing + records, indent=1))


if __name__ == "__main__":
    main()
