"""Train a reference model on Fashion-MNIST, reproducibly from a seed.

Example:
    python -m cptv_plugin.train --model fmnist_vit_tiny --epochs 15 --out cptv_plugin/checkpoints/fmnist_vit_tiny.pt
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .datasets import load_fashion_mnist
from .models import create_reference_model, list_reference_models

logger = logging.getLogger(__name__)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """``model``'s logits for ``images`` (run on the model's device in batches), on the CPU in fp32."""
    from .refinement import device_of

    device = device_of(model)
    outputs = []
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size].to(device))
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        outputs.append(logits.float().cpu())
    return torch.cat(outputs)


def evaluate_top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent of ``model`` on ``images``/``labels`` (runs on the model's device)."""
    predictions = predict_logits(model, images, batch_size).argmax(-1)
    return 100.0 * (predictions == labels.cpu()).sum().item() / len(images)


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels (the usual Fashion-MNIST augmentation)."""
    flip = torch.rand(len(batch), generator=generator, device="cpu").to(batch.device) < 0.5
    batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    padded = F.pad(batch, (2, 2, 2, 2), value=batch.min().item())
    dx, dy = (int(v) for v in torch.randint(0, 5, (2,), generator=generator))
    return padded[..., dy : dy + batch.shape[-2], dx : dx + batch.shape[-1]]


def train(model_name: str, epochs: int, batch_size: int = 256, lr: float = 2e-3, seed: int = 0,
          device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Train ``model_name`` with AdamW and a cosine schedule; return the model and a summary dict."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = create_reference_model(model_name).to(device)
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    train_x, train_y = train_x.to(device), train_y.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    total = epochs * steps_per_epoch
    warmup = steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    start = time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator).to(device)
        for step in range(steps_per_epoch):
            index = order[step * batch_size : (step + 1) * batch_size]
            inputs = _augment(train_x[index], generator)
            loss = F.cross_entropy(model(inputs), train_y[index], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        top1 = evaluate_top1(model, test_x, test_y)
        logger.info("epoch %d/%d loss %.4f test top-1 %.2f%% (%.0f s)", epoch + 1, epochs, loss.item(), top1,
                    time.time() - start)
    summary = {"model": model_name, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
               "test_top1": top1, "seconds": round(time.time() - start, 1), "device": device,
               "torch": str(torch.__version__)}
    return model.cpu().eval(), summary


def save_checkpoint(model: torch.nn.Module, summary: dict, path: str | Path, half: bool = True) -> None:
    """Write ``{"state_dict", "summary"}`` atomically (fp16 weights by default, to keep the file small)."""
    from ._io import atomic_path

    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    with atomic_path(path) as temporary:
        torch.save({"state_dict": state, "summary": summary}, temporary)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=list_reference_models())
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model, summary = train(args.model, args.epochs, args.batch_size, args.lr, args.seed, args.device)
    # fp16 storage rounds the weights: also report the accuracy of exactly what is shipped.
    save_checkpoint(model, summary, args.out)
    shipped = create_reference_model(args.model)
    shipped.load_state_dict({k: v.float() for k, v in torch.load(args.out, weights_only=True)["state_dict"].items()})
    summary["test_top1_fp16_checkpoint"] = evaluate_top1(shipped.eval(), *load_fashion_mnist("test"))
    save_checkpoint(model, summary, args.out)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
