"""How far the calibration KL of a torch.ao FX model (every op quantized) moves when scales move by a few ulps.

Two probes on the CI ViT (``fmnist_vit_tiny``, 200 calibration images, W4A8 by default):

* ``activations`` (any device): each activation scale alone moved by ``±eps`` (relative), the mean KL from the
  full-precision outputs against the unmoved model's, and the share of its inputs that sit on a rounding tie;
  then every scale at once.
* ``nudge`` (CPU): test top-1 and calibration KL at W2A8, W3A8, W4A8 with every weight (or activation) scale
  moved by ±1e-4: how much a MinMax baseline's figure depends on where its ties round.
* ``stage`` (CUDA): the gradient stage from the same scales, eagerly and replayed as CUDA graphs, twice each: the
  checks and how far the kept scales are apart (``tests/test_gradient_cuda.py`` asserts on it).

    python -m benchmarks.scale_sensitivity --probe activations --out benchmarks/results/experiments/x.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os

import torch
from torch.ao.quantization.quantize_fx import prepare_fx

from cptv_plugin.datasets import calibration_subset, load_fashion_mnist
from cptv_plugin.engine import mean_fitness
from cptv_plugin.fitness import get_fitness
from cptv_plugin.fx.refine import FxSession
from cptv_plugin.gradient import gradient_refine
from cptv_plugin.models import load_reference_model
from cptv_plugin.qconfigs import fx_qconfig_mapping, prepare_timm_for_fx


def ci_vit(device: str) -> tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The CI ViT in FP32 on ``device``, its 200 calibration images (CPU), their batches of 50 on ``device`` and
    the model's outputs on them."""
    train_x, _ = load_fashion_mnist("train")
    calib = calibration_subset(train_x, 200, seed=0)
    model = prepare_timm_for_fx(load_reference_model("fmnist_vit_tiny")).to(device)
    batches = list(calib.to(device).split(50))
    with torch.no_grad():
        reference = [model(b) for b in batches]
    return model, calib, batches, reference


def fx_session(model: torch.nn.Module, calib: torch.Tensor, bits: str, device: str) -> FxSession:
    """torch.ao FX with every op quantized at ``bits`` (MinMax, calibrated on the CPU), as a refinement session."""
    prepared = prepare_fx(copy.deepcopy(model).cpu(), fx_qconfig_mapping(bits), example_inputs=(calib[:1],))
    with torch.no_grad():
        for batch in calib.split(50):
            prepared(batch)
    return FxSession(prepared.to(device))


def quantized_vit(bits: str, device: str) -> tuple[FxSession, list[torch.Tensor], list[torch.Tensor]]:
    model, calib, batches, reference = ci_vit(device)
    return fx_session(model, calib, bits, device), batches, reference


def tie_shares(session: FxSession, forward, images: torch.Tensor) -> dict[str, list[float]]:
    """For each activation quantizer, per call in one forward: the share of its inputs x with x / s + z within 1e-6
    of k + 0.5, where round-half-to-even decides and any move of s flips them."""
    shares: dict[str, list[float]] = {}
    hooks = []
    for handle in session.all_handles:
        if handle.role != "activation" or handle.quantizer_module is None:
            continue

        def record(module, args, output, handle=handle):
            scale, zero_point = handle.read().float(), handle.zero_points().float()
            values = args[0].detach().float() * (1.0 / scale) + zero_point
            share = ((values - values.floor() - 0.5).abs() < 1e-6).float().mean()
            shares.setdefault(handle.name, []).append(round(float(share), 5))

        hooks.append(handle.quantizer_module.register_forward_hook(record))
    try:
        with torch.no_grad():
            forward(images)
    finally:
        for hook in hooks:
            hook.remove()
    return shares


def probe_activations(bits: str, eps: float, device: str) -> dict:
    session, batches, reference = quantized_vit(bits, device)
    forward = functools.partial(session.chain.forward, eager=True)
    kl = get_fitness("kl")

    def loss() -> float:
        return mean_fitness(forward, batches, reference, kl, 0.1, True)

    ties = tie_shares(session, forward, batches[0])
    base = loss()
    rows = []
    for handle in session.all_handles:
        if handle.role != "activation":
            continue
        given = handle.read().clone()
        moves = []
        for sign in (1, -1):
            handle.set(given * (1 + sign * eps))
            moves.append(loss() / base - 1)
            handle.set(given)
        rows.append({"quantizer": handle.name, "scale": float(given.flatten()[0]),
                     "kl_change_up": round(moves[0], 5), "kl_change_down": round(moves[1], 5),
                     "inputs_on_ties": ties.get(handle.name)})
    rows.sort(key=lambda r: -max(abs(r["kl_change_up"]), abs(r["kl_change_down"])))
    generator = torch.Generator().manual_seed(0)
    given = [h.read().clone() for h in session.all_handles]
    everything = {}
    for role in ("weight", "activation", None):
        for handle, value in zip(session.all_handles, given):
            moved = role is None or handle.role == role
            signs = torch.randint(0, 2, value.shape, generator=generator).to(value) * 2 - 1
            handle.set(value * (1 + eps * signs) if moved else value)
        everything[role or "all"] = round(loss() / base - 1, 5)
    for handle, value in zip(session.all_handles, given):
        handle.set(value)
    return {"bits": bits, "eps": eps, "kl": base, "every_scale_moved": everything,
            "over_0.1_percent": sum(max(abs(r["kl_change_up"]), abs(r["kl_change_down"])) > 1e-3 for r in rows),
            "activation_quantizers": len(rows), "largest": rows[:10]}


def probe_nudge(bits: str, eps: float, device: str) -> dict:
    """Test top-1 and calibration KL at the given scales and with the weight or activation scales all moved by
    ``±eps``: how much of a baseline's figure its calibration's ties decide."""
    session, batches, reference = quantized_vit(bits, device)
    test_x, test_y = load_fashion_mnist("test")
    forward = functools.partial(session.chain.forward, eager=True)
    kl = get_fitness("kl")
    given = [h.read().clone() for h in session.all_handles]
    rows = {}
    for role, sign in ((None, 0), ("weight", 1), ("weight", -1), ("activation", 1), ("activation", -1)):
        for handle, value in zip(session.all_handles, given):
            handle.set(value * (1 + sign * eps) if handle.role == role else value)
        with torch.no_grad():
            correct = sum(int((forward(x.to(device)).argmax(-1).cpu() == y).sum())
                          for x, y in zip(test_x.split(500), test_y.split(500)))
        rows["given" if role is None else f"{role} x(1{'+' if sign > 0 else '-'}{eps:g})"] = {
            "top1": round(100 * correct / len(test_y), 2),
            "kl": round(mean_fitness(forward, batches, reference, kl, 0.1, True), 6)}
    for handle, value in zip(session.all_handles, given):
        handle.set(value)
    return {"bits": bits, "eps": eps, "scales": rows}


def probe_stage(bits: str, offset: float, lr: float, steps: int) -> dict:
    session, batches, reference = quantized_vit(bits, "cuda")
    handles = session.all_handles
    given = [h.read() * offset for h in handles]
    forward = functools.partial(session.chain.forward, eager=True)
    runs = []
    with session.compilable():
        for graphed in (False, True, False, True):
            for handle, value in zip(handles, given):
                handle.set(value)
            record = gradient_refine(handles, forward, batches, reference, steps=steps, lr=lr, checks=steps,
                                     cuda_graph=graphed)
            runs.append((graphed, [c["loss"] for c in record["history"]],
                         torch.cat([h.read().float().flatten() for h in handles])))
    first = runs[0][2]
    return {"bits": bits, "offset": offset, "lr": lr, "steps": steps,
            "runs": [{"graphed": g, "checks": checks, "max_rel_from_first_eager": float((s / first - 1).abs().max()),
                      "share_over_1e-4": float(((s / first - 1).abs() > 1e-4).float().mean())}
                     for g, checks, s in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--probe", choices=["activations", "nudge", "stage"], default="activations")
    parser.add_argument("--bits", default="W4A8")
    parser.add_argument("--eps", type=float, default=2e-7)
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args()
    if args.probe == "activations":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        figures = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                   **probe_activations(args.bits, args.eps, device)}
    elif args.probe == "nudge":
        figures = {"device": "cpu", "nudges": [probe_nudge(bits, 1e-4, "cpu") for bits in ("W2A8", "W3A8", "W4A8")]}
    else:
        figures = {"device": torch.cuda.get_device_name(),
                   "stages": [probe_stage(bits, offset, lr, 2) for bits, offset, lr in
                              [("W3A8", 1.0, 0.01), ("W3A8", 1.01, 0.01), ("W4A8", 1.01, 0.01), ("W4A8", 1.01, 0.001),
                               ("W3A8", 1.01, 0.001)]]}
    text = json.dumps(figures, indent=1)
    print(text)
    if args.out:
        with open(args.out + ".tmp", "w") as handle:
            handle.write(text + "\n")
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
