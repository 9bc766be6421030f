"""Run by test_distributed under torchrun: PTQ the tiny ViT, refine it on every rank, save what each rank ended with.

    python -m torch.distributed.run --standalone --nproc-per-node N tests/distributed_worker.py SCENARIO OUT_DIR

SCENARIO ``same``: every rank gets the same images (the supported use); ``mismatch``: the last rank gets other
calibration images; ``failing``: the last rank gets images its model cannot take (both must be refused on every rank,
none waiting for the others, each model left as given).
"""

import logging
import os
import sys
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")
sys.path.insert(0, __file__.rsplit("/", 1)[0])

import cptv_plugin  # noqa: E402
from conftest import prepare_and_calibrate  # noqa: E402
from cptv_plugin.datasets import calibration_subset, load_fashion_mnist  # noqa: E402
from cptv_plugin.fx.refine import FxSession  # noqa: E402
from cptv_plugin.models import load_reference_model  # noqa: E402
from cptv_plugin.qconfigs import prepare_timm_for_fx  # noqa: E402

# everything that sums over ranks is on: held-out images, the agreement with the full-precision top-1, the lossless
# check's KL (below any real model's), a checkpoint (rank 0 writes it), a short gradient stage; no start candidates
# (their grid search is most of a CPU run's time and computes nothing across ranks)
CONFIG = cptv_plugin.SearchConfig(passes=1, population=4, cycles=2, samples=2, batch_size=25, progress=False,
                                  precision="fp32", gradient_steps=4, gradient_checks=2, lossless_kl=1e-9,
                                  validation_fraction=0.2, start_candidates=())


class Collect(logging.Handler):
    """The library's log records on this rank, as (level, message)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelname, record.getMessage()))


def main(scenario: str, out: str) -> None:
    torch.set_num_threads(1)
    library, log = logging.getLogger("cptv_plugin"), Collect()
    library.setLevel(logging.INFO)
    library.addHandler(log)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    train = load_fashion_mnist("train")[0]
    calib = calibration_subset(train, 200, seed=0)
    prepared = prepare_and_calibrate(prepare_timm_for_fx(load_reference_model("fmnist_vit_tiny")), calib, "W3A8")
    given = [h.read().clone() for h in FxSession(prepared).all_handles]
    if scenario == "mismatch" and rank == world - 1:
        calib = calibration_subset(train, 200, seed=1)
    if scenario == "failing" and rank == world - 1:
        calib = calib[..., :20, :20]
    record = {"rank": rank, "world": world}
    try:
        result = cptv_plugin.refine_fx(prepared, calib, config=CONFIG.replace(
            checkpoint_path=os.path.join(out, f"search-{world}.ckpt")))
        record.update(initial_fitness=result.initial_fitness, final_fitness=result.final_fitness,
                      evaluations=result.evaluations, ranks=result.ranks, validation=result.validation,
                      agreement=result.initial_agreement, start=result.start, gradient=result.gradient["history"],
                      lossless=result.lossless, text=str(result))
    except Exception as error:  # noqa: BLE001 - the test reads what was raised
        record["error"] = (type(error).__name__, str(error))
    scales = [h.read() for h in FxSession(prepared).all_handles]
    record.update(scales=scales, unchanged=all(torch.equal(a, b) for a, b in zip(given, scales)), log=log.records,
                  level_after=library.level)
    if "error" not in record:
        from torch.ao.quantization.quantize_fx import convert_fx

        with torch.no_grad():
            record["converted_output"] = convert_fx(prepared)(load_fashion_mnist("test")[0][:64])
    torch.save(record, os.path.join(out, f"{scenario}-{world}-rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
