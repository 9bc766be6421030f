"""One refinement spread over several processes (``torchrun``): each rank evaluates every candidate on its share
of the calibration batches and the fitness is summed across the ranks, so every rank makes the same choices and
ends with the scales one process would have found (DESIGN.md, engine performance).

Every rank calls the same ``refine_*`` with the same model, calibration images and config (each on its own
device); :class:`Shard` is how the rest of the library asks which batches are this rank's and sums what they
measured. Without an initialized process group (or with ``SearchConfig(distributed=False)``) it is a single
process's shard of everything and every method is the identity.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch

from .data import CalibrationError

__all__ = ["Shard", "RankMismatchError"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RankMismatchError(ValueError):
    """The ranks of a distributed refinement were not given the same model, calibration images and config."""


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world`` ranks of torch.distributed's default process group; collectives run
    on ``device`` (NCCL needs CUDA tensors, gloo takes CPU ones)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def for_run(cls, distributed: bool | None, device: torch.device) -> "Shard":
        """The shard of a refinement with ``SearchConfig(distributed=...)`` on ``device``: ``None`` spreads it over
        the default process group when one with several ranks is initialized, ``False`` keeps it in this process,
        ``True`` requires a process group."""
        import torch.distributed as dist

        initialized = dist.is_available() and dist.is_initialized()
        if distributed is False or (distributed is None and not initialized):
            return cls(device=device)
        if not initialized:
            raise ValueError("SearchConfig(distributed=True) needs torch.distributed's default process group: launch "
                             "with torchrun and call torch.distributed.init_process_group() (backend 'nccl' on GPUs, "
                             "'gloo' on the CPU) before refining, or leave distributed unset")
        if dist.get_world_size() == 1:
            return cls(device=device)
        if dist.get_backend() == "nccl" and device.type != "cuda":
            raise ValueError(f"the process group's backend is nccl but the model is on {device}: move each rank's "
                             "model to its GPU (model.to(f'cuda:{local_rank}')) or use the gloo backend on the CPU")
        shard = cls(dist.get_rank(), dist.get_world_size(), device)
        logger.info("rank %d of %d: sharing this refinement with the other ranks, each of which must make the same "
                    "call (SearchConfig(distributed=False) keeps it to this process)", shard.rank, shard.world)
        return shard

    @property
    def active(self) -> bool:
        """Whether more than one rank shares the work."""
        return self.world > 1

    @property
    def leader(self) -> bool:
        """Rank 0: the one that writes checkpoints and shows progress."""
        return self.rank == 0

    @contextlib.contextmanager
    def quiet_followers(self) -> Iterator[None]:
        """While the refinement runs, on ranks other than 0: the library's log records below ERROR are dropped.
        Every rank makes the same choices, so rank 0's log tells them once instead of once per GPU; a rank's own
        failure is raised on that rank (and named on the others by :meth:`check_same`)."""
        if not self.active or self.leader:
            yield
            return
        library = logging.getLogger(__name__.partition(".")[0])
        level = library.level
        library.setLevel(max(level, logging.ERROR))
        try:
            yield
        finally:
            library.setLevel(level)

    def batches(self, batches: list[torch.Tensor], what: str = "calibration") -> list[torch.Tensor]:
        """This rank's share of ``batches``: whole batches (InfoNCE's negatives stay together), consecutive, as
        even as the count allows."""
        if not self.active:
            return batches
        if len(batches) < self.world:
            raise CalibrationError(
                f"{len(batches)} {what} batches cannot be shared by {self.world} ranks (each rank evaluates whole "
                f"batches): pass at least {self.world} batches' worth of images, a smaller batch_size, or fewer ranks")
        bounds = [len(batches) * r // self.world for r in range(self.world + 1)]
        return batches[bounds[self.rank]:bounds[self.rank + 1]]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (every rank gets the same values back)."""
        if not self.active:
            return tensor
        import torch.distributed as dist

        summed = tensor.to(self.device).clone()
        dist.all_reduce(summed)
        return summed.to(tensor.device)

    def mean(self, values: list[float]) -> float:
        """The mean of every rank's ``values`` together (one all-reduce of their sum and count)."""
        if not self.active:
            return sum(values) / len(values)
        total, count = self.sum(torch.tensor([sum(values), len(values)], dtype=torch.float64)).tolist()
        return total / count

    def from_leader(self, compute: Callable[[], T]) -> T:
        """``compute()`` on rank 0, its result (or its exception) on every rank: for what only rank 0 may do, such
        as reading a checkpoint that only it writes."""
        if not self.active:
            return compute()
        import torch.distributed as dist

        box: list[Any] = [None]
        if self.leader:
            try:
                box[0] = ("value", compute())
            except Exception as error:  # every rank raises it, none waits for a broadcast that never comes
                box[0] = ("error", error)
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        kind, payload = box[0]
        if kind == "error":
            raise payload
        return payload

    def check_same(self, fingerprint: str | Exception) -> None:
        """Raise on every rank unless every rank's ``fingerprint`` (of the model's scales, the calibration images and
        the config) is the same. A rank that failed before it could compute one passes its exception: it raises that
        one, every other rank a :class:`RankMismatchError` that names it (rather than waiting for it forever). With
        one rank: nothing to compare (the caller raises its own errors)."""
        if not self.active:
            return
        import torch.distributed as dist

        prints: list[Any] = [None] * self.world
        dist.all_gather_object(prints, fingerprint if isinstance(fingerprint, str)
                               else f"error: {type(fingerprint).__name__}: {fingerprint}")
        if isinstance(fingerprint, Exception):
            raise fingerprint
        failed = {rank: other for rank, other in enumerate(prints) if other.startswith("error: ")}
        if failed:
            rank, message = next(iter(failed.items()))
            raise RankMismatchError(f"rank {rank} could not start the refinement ({message[len('error: '):]}); "
                                    "every rank stops here")
        differing = [rank for rank, other in enumerate(prints) if other != prints[0]]
        if differing:
            raise RankMismatchError(
                f"ranks {differing} were given another model, calibration set or config than rank 0 (fingerprints "
                f"{prints[0][:12]}… and {prints[differing[0]][:12]}…): every rank must call refine with the same "
                "calibrated model, the same calibration images in the same order and the same SearchConfig (only "
                "`device` may differ). A DistributedSampler gives each rank other images: pass every rank the whole "
                "calibration set, cptv_plugin shares it out itself")

    def agree(self, tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Rank 0's ``tensors`` (e.g. every refined scale) if any rank holds other values, else ``None`` (a GPU
        kernel that is not bit-reproducible run to run can make them differ; the search's choices cannot, they are
        made on summed fitness)."""
        if not self.active:
            return None
        import torch.distributed as dist

        digest = hashlib.sha256()
        for tensor in tensors:
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        prints: list[Any] = [None] * self.world
        dist.all_gather_object(prints, digest.hexdigest())
        if len(set(prints)) == 1:
            return None
        agreed = [tensor.detach().to(self.device).clone() for tensor in tensors]
        for tensor in agreed:
            dist.broadcast(tensor, src=0)
        if self.leader:
            logger.warning("the ranks' scales differed after the refinement (a kernel that is not bit-reproducible); "
                           "every rank now holds rank 0's")
        return [a.to(t.device) for a, t in zip(agreed, tensors)]
