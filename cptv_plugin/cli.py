"""``cptv``: the command line. ``cptv demo`` runs the whole job on an embedded model."""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import time
import warnings
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from .config import SearchConfig

__all__ = ["main", "run_demo"]


def run_demo(bits: str = "W2A8", preset: str | SearchConfig = "fast", calibration: int = 1000, seed: int = 0,
             model_name: str = "fmnist_vit_tiny", test_images: int | None = None) -> dict:
    """PTQ with torch.ao FX, CPT-V refinement, and top-1 before/after on the Fashion-MNIST test set. ``preset`` is a
    preset's name or a ``SearchConfig``."""
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from . import SearchConfig, refine_fx
    from .datasets import calibration_subset, load_fashion_mnist
    from .models import load_reference_model
    from .qconfigs import fx_qconfig_mapping, prepare_timm_for_fx
    from .train import evaluate_top1

    torch.manual_seed(seed)
    model = prepare_timm_for_fx(load_reference_model(model_name))
    train_images, _ = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    if test_images:
        test_x, test_y = test_x[:test_images], test_y[:test_images]
    calib = calibration_subset(train_images, calibration, seed=seed)
    rows = [("fp32", evaluate_top1(model, test_x, test_y), None, None)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        prepared = prepare_fx(model, fx_qconfig_mapping(bits), example_inputs=(calib[:1],))
        with torch.no_grad():
            for batch in calib.split(100):
                prepared(batch)
        baseline = convert_fx(copy.deepcopy(prepared))
        rows.append((f"baseline PTQ ({bits}, MinMax)", evaluate_top1(baseline, test_x, test_y), None, None))
        config = SearchConfig.preset(preset, seed=seed)
        result = refine_fx(prepared, calib, config=config)
        refined = convert_fx(prepared)
    rows.append((f"cpt-v refined ({config.name} preset)", evaluate_top1(refined, test_x, test_y),
                 f"{result.initial_fitness:.4f} -> {result.final_fitness:.4f}", f"{result.seconds:.0f} s"))
    return {"model": model_name, "bits": bits, "rows": rows, "passes": config.passes, "evaluations": result.evaluations,
            "gradient_steps": result.gradient["steps"] if result.gradient else 0, "test_images": len(test_x)}


def _print_table(report: dict) -> None:
    print(f"\nmodel {report['model']} on {report['test_images']} Fashion-MNIST test images, {report['bits']}")
    print(f"{'model':<34} {'top-1 %':>8}  {'fitness':>17}  {'search':>7}")
    for name, top1, fitness, seconds in report["rows"]:
        print(f"{name:<34} {top1:>8.2f}  {fitness or '':>17}  {seconds or '':>7}")


def _bit_setting(text: str) -> str:
    """argparse type of ``--bits``: a setting ``parse_bits`` accepts (``W4A8``), refused as a usage error."""
    from .qconfigs import parse_bits

    try:
        parse_bits(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _at_least(minimum: int) -> Callable[[str], int]:
    """argparse type of a count: a whole number of at least ``minimum``, refused as a usage error otherwise."""
    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number of at least {minimum}, got {text!r}")
        return value
    return count


def _add_search_settings(command: argparse.ArgumentParser, preset: str) -> None:
    """The options every refining command takes: the preset (``preset`` unless given), a settings file, the seed
    and the search's length."""
    command.add_argument("--preset", default=None, choices=["fast", "default", "paper"],
                         help=f"search settings, {preset!r} unless given: fast for a quick try, default for the "
                              "most accurate result, paper for the published preset")
    command.add_argument("--config", default=None, metavar="FILE",
                         help="search settings from a JSON file: SearchConfig's settings by name, e.g. "
                              '{"preset": "fast", "gradient_steps": 0} (without "preset", they change the default '
                              "preset); --preset, --seed, --passes and --gradient-steps, where given, override it")
    command.add_argument("--seed", type=int, default=None,
                         help="seed of the search (default: the config file's, else 0): the same seed gives the same "
                              "scales on the CPU")
    command.add_argument("--passes", type=_at_least(1), default=None,
                         help="passes of the search over the blocks (default: the preset's, 3 for fast, 10 for "
                              "default and paper); fewer for a quicker, less accurate try")
    command.add_argument("--gradient-steps", type=_at_least(0), default=None,
                         help="steps of the gradient stage after the search (default: the preset's, 300 for fast and "
                              "1000 for default; 0 skips it: the demo's refinement took 169 s with fast's 300 "
                              "steps on a 2-core CPU, 51 s without)")
    command.set_defaults(default_preset=preset)


def _config(args: argparse.Namespace, command: argparse.ArgumentParser) -> SearchConfig:
    """The search settings the command line gives: the ``--config`` file's (else the command's preset), then
    ``--preset``, ``--seed``, ``--passes`` and ``--gradient-steps`` where given. A file that cannot be read or holds
    a setting ``SearchConfig`` refuses is a usage error, reported by ``command``."""
    from . import SearchConfig

    settings: dict = {"preset": args.default_preset}
    if args.config is not None:
        try:
            with open(args.config, encoding="utf-8") as file:
                settings = json.load(file)
        except (OSError, json.JSONDecodeError) as error:
            command.error(f"--config {args.config}: {error}")
        if not isinstance(settings, dict):
            command.error(f"--config {args.config}: expected a JSON object of settings, e.g. "
                          f'{{"preset": "fast", "passes": 2}}; got a {type(settings).__name__}')
    given = {"preset": args.preset, "seed": args.seed, "passes": args.passes, "gradient_steps": args.gradient_steps}
    settings.update({name: value for name, value in given.items() if value is not None})
    try:
        return SearchConfig.resolve(settings)
    except (TypeError, ValueError) as error:
        command.error(f"--config {args.config}: {error}" if args.config is not None else str(error))


@contextlib.contextmanager
def _torchrun_process_group(device: str | None):
    """Under torchrun (``WORLD_SIZE`` > 1): torch.distributed's process group for the command's lifetime (nccl on
    GPUs, gloo on the CPU) and this rank's device (``cuda:LOCAL_RANK`` for ``cuda`` or none given); else ``device``
    as given."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or torch.distributed.is_initialized():
        yield device
        return
    if device in (None, "cuda") and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if device is not None and device.startswith("cuda"):
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device is not None and device.startswith("cuda") else "gloo")
    yield device  # after a failure no collective teardown (it can hang): torchrun stops the other ranks
    # rank 0 may still be writing when the others return: a rank that tore the group down then could abort in
    # gloo ("terminate called without an active exception", seen once in the test suite)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _versions() -> str:
    """``cptv_plugin X (python, torch, timm, modelopt ...)``: the versions a bug report needs, read from the installed
    distributions' metadata, without importing them."""
    import platform
    from importlib import metadata

    from . import __version__

    found = [f"python {platform.python_version()}"]
    for name in ("torch", "timm", "torchao", "nvidia-modelopt", "pytorch-quantization", "onnx", "onnxruntime"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{name} {metadata.version(name)}")
    try:  # the installed distribution's version (pyproject reads it from __version__); a bare checkout has none
        installed = metadata.version("cptv_plugin")
    except metadata.PackageNotFoundError:
        installed = __version__
    if installed != __version__:  # an install older than the checkout on the path: say which code runs
        found.append(f"installed as {installed}")
    return f"cptv_plugin {__version__} ({', '.join(found)})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cptv", description="CPT-V refinement of quantized vision transformers",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # --version on one line
    parser.add_argument("--version", action="version", version=_versions(),
                        help="print this package's version and those of the libraries it runs on (for bug reports)")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="PTQ → refine → top-1 before and after, on an embedded ViT")
    demo.add_argument("--bits", type=_bit_setting, default="W2A8", help="bit setting, e.g. W4A8 (default W2A8)")
    demo.add_argument("--calibration", type=_at_least(1), default=1000, help="calibration images (default 1000)")
    demo.add_argument("--test-images", type=_at_least(1), default=None,
                      help="score on the first N test images only (default: all 10,000)")
    _add_search_settings(demo, "fast")
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
    post = commands.add_parser(
        "refine-modelopt", help="refine a ModelOpt checkpoint (mto.save) and write a new one for mto.restore")
    post.add_argument("checkpoint", help="the checkpoint mto.save wrote (read only, never modified)")
    post.add_argument("--model", required=True,
                      help="constructor of the full-precision model: timm:NAME, cptv:NAME or package.module:function")
    post.add_argument("--model-kwargs", default="{}", help='constructor kwargs as JSON, e.g. \'{"num_classes": 10}\'')
    post.add_argument("--calibration", required=True,
                      help="'fashion-mnist', a folder of images (ImageNet layout or flat) or a tensor file")
    post.add_argument("--calibration-size", type=_at_least(1), default=1000,
                      help="calibration images used (default 1000)")
    post.add_argument("--out", required=True, help="where to write the refined checkpoint")
    post.add_argument("--onnx", default=None, metavar="PATH",
                      help="also write the refined model as ONNX with Q/DQ nodes for TensorRT (opset 17, dynamic "
                           "batch, checked against TensorRT's rules; activations must have 8 bits)")
    _add_search_settings(post, "default")
    post.add_argument("--overwrite", action="store_true", help="replace an existing --out (or --onnx) file")
    post.add_argument("--device", default=None,
                      help="where to refine: cuda, cuda:N or cpu (default: a GPU if there is one; under torchrun "
                           "each rank its own, cuda:LOCAL_RANK)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        start = time.time()
        config = _config(args, demo)
        report = run_demo(args.bits, config, args.calibration, config.seed, test_images=args.test_images)
        report["seconds"] = round(time.time() - start, 1)
        print(json.dumps(report)) if args.json else _print_table(report)
    elif args.command == "refine-modelopt":
        from .amax.modelopt import check_checkpoint_paths, refine_modelopt_checkpoint

        try:
            kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as error:
            post.error(f"--model-kwargs is not valid JSON: {error}")
        try:  # a wrong path is a usage error: say so before loading anything, without a traceback
            check_checkpoint_paths(args.checkpoint, args.out, args.overwrite, args.onnx)
        except (OSError, ValueError) as error:
            post.error(str(error))
        config = _config(args, post)
        with _torchrun_process_group(args.device) as device:
            result = refine_modelopt_checkpoint(
                args.checkpoint, args.model, args.calibration, args.out, model_kwargs=kwargs,
                config=config, calibration_size=args.calibration_size,
                seed=config.seed, overwrite=args.overwrite, device=device, onnx=args.onnx)
            if result.ranks == 1 or torch.distributed.get_rank() == 0:
                print(f"{result}\nwrote {args.out}" + (f"\nwrote {args.onnx}" if args.onnx else ""))


if __name__ == "__main__":
    main()
