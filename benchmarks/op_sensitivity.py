"""Which ops' activation quantizers cost a torch.ao FX model (every op quantized) its accuracy.

    python -m benchmarks.op_sensitivity [--model fmnist_levit] [--bits W4A4] [--start baseline|refined]
                                         [--out FILE]

The reference model is quantized as the accuracy benchmark's e2e placement does (torch.ao's global qconfig, MinMax,
activations simulated with their narrowed range). Its activation quantizers are grouped by the op whose output they
quantize (``Linear``, ``Hardswish``, ``add``, ``matmul``, ``softmax``, ...; ``input`` for the image). Per group the
test top-1 is measured twice: with that group left in full precision (everything else quantized: what the group
costs) and with only that group quantized (what it costs alone). ``--start refined`` first refines the model with
``--preset`` (the rows of the issue measure the refined model, whose activation ranges are no longer MinMax's).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch
from torch import fx, nn

from cptv_plugin._io import atomic_path


# ops that pass values through unchanged in what they are (shape ops, dropout at eval, another quantizer): the kind
# is named after what made the values
_PASS_THROUGH = {"reshape", "reshape_as", "view", "view_as", "permute", "transpose", "flatten", "contiguous",
                 "unflatten", "expand", "squeeze", "unsqueeze", "chunk", "split", "getitem", "__getitem__"}


def producer_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    """The kind of op whose output ``node`` (a simulated quantizer) reads: a module's class name (a Linear/Conv
    with simulated weights by its own, fused modules joined by ``+``), a function's or method's name, ``input``."""
    from cptv_plugin.fx.quantizers import SimulatedWeightModule

    source = node.args[0] if node.args else None
    while isinstance(source, fx.Node):
        if source.op == "call_module":
            module = gm.get_submodule(source.target)
            if str(source.target).startswith("cptv_sim_") or isinstance(module, (nn.Identity, nn.Dropout)):
                source = source.args[0]
                continue
            if isinstance(module, SimulatedWeightModule):
                module = module.module
            if isinstance(module, nn.Sequential):
                return "+".join(type(m).__name__ for m in module)
            return type(module).__name__
        name = getattr(source.target, "__name__", str(source.target))
        if source.op in ("call_function", "call_method") and name in _PASS_THROUGH:
            source = source.args[0]
            continue
        return {"placeholder": "input", "get_attr": "constant"}.get(source.op, name)
    return "constant"


def simulated_activations(gm: fx.GraphModule) -> dict[str, list[str]]:
    """Kind → names of the simulated activation quantizers (``cptv_sim_*`` modules reading a non-constant)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith("cptv_sim_"):
            if node.all_input_nodes and all(a.op == "get_attr" for a in node.all_input_nodes):
                continue  # a weight
            groups[producer_kind(gm, node)].append(node.target)
    return dict(groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fmnist_levit")
    parser.add_argument("--bits", default="W4A4")
    parser.add_argument("--start", default="baseline", choices=["baseline", "refined"])
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--detail", nargs="*", default=["Hardswish", "Conv2d"],
                        help="kinds whose quantizers are also measured one by one (alone quantized)")
    parser.add_argument("--eight-bit-activations", nargs="*", default=[], metavar="MODULE",
                        help="modules (e.g. stem) whose qconfig keeps the weights' bits but 8-bit activations")
    parser.add_argument("--device", default="cpu", help="where to quantize, refine and evaluate (cpu, cuda)")
    parser.add_argument("--out", default="benchmarks/results/experiments/op_sensitivity_cpu.json")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    import cptv_plugin
    from benchmarks.accuracy import evaluation_model, fx_target, quantize_e2e
    from cptv_plugin.datasets import fashion_mnist_splits
    from cptv_plugin.models import load_reference_model
    from cptv_plugin.train import evaluate_top1

    model = load_reference_model(args.model)
    calib, test_x, test_y = fashion_mnist_splits(1000, args.test_images, seed=args.seed)
    device = torch.device(args.device)
    model, calib, test_x = model.to(device), calib.to(device), test_x.to(device)
    prepared = quantize_e2e(model, calib, args.bits, "baseline", args.eight_bit_activations)
    record = {"model": args.model, "bits": args.bits, "start": args.start, "test_images": len(test_x),
              "eight_bit_activations": args.eight_bit_activations,
              "device": str(device), "fp32": evaluate_top1(model, test_x, test_y)}
    if args.start == "refined":
        started = time.time()
        config = cptv_plugin.SearchConfig.preset(args.preset, seed=args.seed, progress=False)
        result = cptv_plugin.refine_fx(prepared, calib, config=config, target=fx_target("e2e", args.bits))
        record.update(preset=args.preset, refine_seconds=round(time.time() - started, 1),
                      fitness=[result.initial_fitness, result.final_fitness])
    gm = evaluation_model(prepared, "e2e", args.bits)
    groups = simulated_activations(gm)
    originals = {name: getattr(gm, name) for names in groups.values() for name in names}

    def top1_with(full_precision: set[str]) -> float:
        for name, module in originals.items():
            setattr(gm, name, nn.Identity() if name in full_precision else module)
        return round(evaluate_top1(gm, test_x, test_y), 2)

    record["quantized"] = top1_with(set())
    record["activations_full_precision"] = top1_with(set(originals))
    record["groups"] = {}
    for kind, names in sorted(groups.items(), key=lambda item: -len(item[1])):
        others = set(originals) - set(names)
        record["groups"][kind] = {"quantizers": len(names), "left_full_precision": top1_with(set(names)),
                                  "alone_quantized": top1_with(others)}
        print(kind, record["groups"][kind], flush=True)
        if kind in args.detail:
            inputs = {str(n.target): str(n.args[0]) for n in gm.graph.nodes if str(n.target) in names}
            record["groups"][kind]["each_alone_quantized"] = {
                f"{name} (reads {inputs[name]})": top1_with(set(originals) - {name}) for name in names}
            print(record["groups"][kind]["each_alone_quantized"], flush=True)
    with atomic_path(args.out) as temporary:
        temporary.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "groups"}))


if __name__ == "__main__":
    main()
