"""Run by test_reliability in a subprocess: PTQ the tiny ViT, refine with a checkpoint, save the scales.

    python tests/resume_worker.py CHECKPOINT OUT
"""

import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, __file__.rsplit("/", 1)[0])

import cptv_plugin  # noqa: E402
from conftest import prepare_and_calibrate  # noqa: E402
from cptv_plugin.datasets import calibration_subset, load_fashion_mnist  # noqa: E402
from cptv_plugin.fx.refine import FxSession  # noqa: E402
from cptv_plugin.models import load_reference_model  # noqa: E402
from cptv_plugin.qconfigs import prepare_timm_for_fx  # noqa: E402

# no activation starts: a resume after them is covered in process (test_starts); here the kill is what is tested
CONFIG = cptv_plugin.SearchConfig(passes=2, population=6, cycles=2, samples=3, batch_size=50, progress=False,
                                  precision="fp32", gradient_steps=0, start_candidates=())


def main(checkpoint: str, out: str) -> None:
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)  # as tests/conftest.py
    calib = calibration_subset(load_fashion_mnist("train")[0], 100, seed=0)
    prepared = prepare_and_calibrate(prepare_timm_for_fx(load_reference_model("fmnist_vit_tiny")), calib, "W3A8")
    result = cptv_plugin.refine_fx(prepared, calib, config=CONFIG.replace(checkpoint_path=checkpoint))
    torch.save({"scales": [h.read() for h in FxSession(prepared).all_handles], "resumed_from": result.resumed_from,
                "final_fitness": result.final_fitness}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
