"""Where the time of a compiled search goes (a diagnostic for the speed benchmark): compile time per distinct
segment, and how busy the GPU is during one group visit of the paper preset (the rest is the host's share).

    python -m benchmarks.profile_search --model deit_tiny_patch16_224 --framework modelopt
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def busy_seconds(prof) -> float:
    """Union of the GPU kernel intervals in a profile, in seconds."""
    intervals = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for start, stop in intervals:
        if stop <= end:
            continue
        busy += stop - max(start, end)
        end = stop
    return busy / 1e6


def visit(group, evaluator, generator, rng, population=15, cycles=3, samples=10, step=1e-3):
    """One group visit of the paper preset, as ``evolutionary_search`` makes it (the population queued, the
    children one at a time)."""
    from cptv_plugin.search import _evaluate_all, mutate

    current = group.read()
    evaluator.advance(group.segment)
    candidates = [mutate(current, step, "absolute", generator) for _ in range(population - 1)]
    members = [(current, evaluator(group.segment))]
    members += zip(candidates, _evaluate_all(group, candidates, evaluator, group.segment))
    for _ in range(cycles):
        drawn = rng.sample(range(len(members)), min(samples, len(members)))
        parent = min(drawn, key=lambda i: members[i][1])
        child = mutate(members[parent][0], step, "absolute", generator)
        group.set(child)
        members.append((child, evaluator(group.segment)))
        members.pop(max(range(len(members)), key=lambda i: members[i][1]))
    group.set(min(members, key=lambda m: m[1])[0])


def main(argv: list[str] | None = None) -> None:
    import timm

    from benchmarks.speed import _quantized
    from cptv_plugin.engine import Evaluator, reference_outputs

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--framework", choices=["fx", "modelopt"], default="modelopt")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                        help="torch._inductor.config settings to try (values parsed as Python literals)")
    parser.add_argument("--table-group", choices=["first", "middle", "last"], default="middle",
                        help="the group whose suffix the per-kernel table profiles (first: the whole model)")
    args = parser.parse_args(argv)
    import ast

    import torch._inductor.config as inductor_config

    from cptv_plugin import engine

    for setting in args.inductor:
        key, _, value = setting.partition("=")
        target, _, leaf = key.rpartition(".")
        setattr(inductor_config if not target else getattr(inductor_config, target), leaf, ast.literal_eval(value))
        # the engine compiles with its own options, which win over the global config
        engine.COMPILE_OPTIONS["options"][key] = ast.literal_eval(value)
    print(f"inductor: compile_threads={inductor_config.compile_threads}, "
          f"autotune_pointwise={inductor_config.triton.autotune_pointwise}, settings {args.inductor}", flush=True)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval().to(device)
    calib = torch.randn(args.images, 3, 224, 224, device=device)
    quantized, _, session_of = _quantized(model, calib, args.framework, "W4A8")
    session = session_of(copy.deepcopy(quantized).requires_grad_(False))
    batches = list(calib.split(100))
    session.set_quantization(False)
    reference = reference_outputs(session.chain.forward, batches)
    session.set_quantization(True)
    with session.compilable() as obstacle:
        assert obstacle is None, obstacle
        start = time.perf_counter()
        distinct = session.chain.compile()
        evaluator = Evaluator(session.chain, batches, reference, "infonce", 0.1, True, compute_batch_size=1000,
                              precision="bf16")
        with torch.autocast(device.type, dtype=torch.bfloat16), torch.no_grad():
            env = session.chain.initial_env(evaluator._inputs[0])
            for index in range(len(session.chain.segments)):
                _sync()
                begin = time.perf_counter()
                env = session.chain.run(env, index, index + 1)
                _sync()
                print(f"segment {index:2d} first call {time.perf_counter() - begin:7.2f} s", flush=True)
        print(f"compiled {distinct} distinct graphs of {len(session.chain.segments)} segments in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        generator, rng = torch.Generator().manual_seed(0), random.Random(0)
        groups = session.groups
        middle = groups[len(groups) // 2]
        for group in groups:  # warm every path once
            visit(group, evaluator, generator, rng, population=2, cycles=0)
        for label, group in (("first", groups[0]), ("middle", middle), ("last", groups[-1])):
            # the cache at this group's input before the clock starts: refilling it from the images (a prefix
            # forward pass) is not part of a visit in a search, which moves the cache one group at a time, and
            # the profiled visit below would not pay it either (until session 21 it was counted as idle time)
            evaluator.advance(group.segment)
            _sync()
            begin = time.perf_counter()
            visit(group, evaluator, generator, rng)
            _sync()
            wall = time.perf_counter() - begin
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                visit(group, evaluator, generator, rng)
                _sync()
            busy = busy_seconds(prof)
            print(f"visit of the {label} group (segment {group.segment}): {wall * 1000 / 18:.2f} ms per evaluation, "
                  f"GPU busy {busy * 1000 / 18:.2f} ms per evaluation under the profiler", flush=True)
        profiled = {"first": groups[0], "middle": middle, "last": groups[-1]}[args.table_group]
        evaluator.advance(profiled.segment)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                evaluator(profiled.segment)
            _sync()
        print(f"3 evaluations from the {args.table_group} group (segment {profiled.segment}):", flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90),
              flush=True)


if __name__ == "__main__":
    main()
