"""Several ranks (torchrun, gloo on the CPU) refine exactly as one process does; bad launches are refused."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cptv_plugin
from cptv_plugin import SearchConfig
from cptv_plugin.data import CalibrationError
from cptv_plugin.distributed import Shard
from conftest import environment_with_this_package

WORKER = Path(__file__).with_name("distributed_worker.py")
# one thread per rank; gloo on the loopback interface (a container's hostname may not resolve to an address); the
# ranks import the cptv_plugin this test imported
LAUNCH_ENV = environment_with_this_package(OMP_NUM_THREADS="1",
                                           GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))


def run_ranks(scenario: str, ranks: int, out: Path) -> list[dict]:
    """``tests/distributed_worker.py SCENARIO`` under torchrun with ``ranks`` processes; what each rank saved."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               str(WORKER), scenario, str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=LAUNCH_ENV)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [torch.load(out / f"{scenario}-{ranks}-rank{rank}.pt", weights_only=False) for rank in range(ranks)]


def assert_same_figures(got, expected, where: str) -> None:
    """Numbers equal to 1e-12 relative, anything else (None, text, flags) equal, through nested dicts and lists
    (pytest.approx itself refuses a None under a relative tolerance since pytest 9.2)."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            assert_same_figures(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(expected), where
        for index, (a, b) in enumerate(zip(got, expected)):
            assert_same_figures(a, b, f"{where}[{index}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-12), where
    else:
        assert got == expected, where


@pytest.fixture(scope="module")
def one_and_two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    return run_ranks("same", 1, out), run_ranks("same", 2, out), out


def test_two_ranks_refine_to_exactly_the_scales_of_one_process(one_and_two_ranks):
    (alone,), ranks, _ = one_and_two_ranks
    assert alone["ranks"] == 1 and all(r["ranks"] == 2 for r in ranks)
    assert not alone["unchanged"], "the search moved nothing: the comparison would prove nothing"
    losses = [check["loss"] for check in alone["gradient"]]
    assert len(set(losses)) == len(losses), "the gradient stage moved nothing: its steps would go unchecked"
    for rank in ranks:
        assert "error" not in rank, rank.get("error")
        assert all(torch.equal(a, b) for a, b in zip(alone["scales"], rank["scales"]))
        torch.testing.assert_close(rank["converted_output"], alone["converted_output"], rtol=0, atol=0)
        # every figure that sums over ranks: the fitness, held-out fitness, agreement, lossless KL, the stage's checks
        for key in ("initial_fitness", "final_fitness", "evaluations", "validation", "agreement", "start",
                    "lossless", "gradient"):
            assert_same_figures(rank[key], alone[key], key)
    assert "2 ranks" in ranks[0]["text"]


def test_only_rank_zero_writes_the_checkpoint_and_a_finished_search_removes_it(one_and_two_ranks):
    _, _, out = one_and_two_ranks
    assert not list(out.glob("*.ckpt*")), "a finished search leaves no checkpoint (or temporary file) behind"


def test_only_rank_zero_logs_the_refinement_and_the_other_ranks_get_their_logging_back(one_and_two_ranks):
    (alone,), (first, second), _ = one_and_two_ranks
    said = lambda rank: [message for _, message in rank["log"]]  # noqa: E731
    assert any(m.startswith("search done") for m in said(alone))
    assert any(m.startswith("search done") for m in said(first))
    # rank 1 announces itself (before the refinement starts), then is silent: rank 0 says the same things once
    assert said(second) == ["rank 1 of 2: sharing this refinement with the other ranks, each of which must make the "
                            "same call (SearchConfig(distributed=False) keeps it to this process)"]
    assert first["level_after"] == second["level_after"] == logging.INFO


def test_ranks_given_other_images_are_all_refused_and_left_as_given(tmp_path):
    for rank in run_ranks("mismatch", 2, tmp_path):
        assert rank["error"][0] == cptv_plugin.RankMismatchError.__name__, rank["error"]
        assert "same calibration images" in rank["error"][1] and "ranks [1]" in rank["error"][1]
        assert rank["unchanged"]


def test_a_rank_that_cannot_start_stops_every_rank_with_its_reason(tmp_path):
    first, failing = run_ranks("failing", 2, tmp_path)  # the last rank's images do not fit the model
    assert failing["error"][0] == "CalibrationError" and "cannot run on calibration images" in failing["error"][1]
    assert first["error"][0] == "RankMismatchError", first["error"]
    assert "rank 1 could not start" in first["error"][1] and "CalibrationError" in first["error"][1]
    assert first["unchanged"] and failing["unchanged"]


def test_a_rank_needs_a_whole_batch_of_its_own():
    batches = [torch.zeros(50, 1, 28, 28), torch.zeros(50, 1, 28, 28), torch.zeros(20, 1, 28, 28)]
    assert [len(b) for b in Shard(rank=1, world=2).batches(batches)] == [50, 20]
    assert [len(b) for b in Shard(rank=0, world=3).batches(batches)] == [50]
    with pytest.raises(CalibrationError, match="3 calibration batches cannot be shared by 4 ranks"):
        Shard(rank=0, world=4).batches(batches)


def test_distributed_true_without_a_process_group_names_the_fix():
    with pytest.raises(ValueError, match="init_process_group"):
        Shard.for_run(True, torch.device("cpu"))
    assert not Shard.for_run(None, torch.device("cpu")).active
    with pytest.raises(ValueError, match="distributed must be None, True or False"):
        SearchConfig(distributed="yes")
