"""The block-by-block pipeline over several processes, with torch.distributed as the engine.

Started by `torchrun` or `accelerate launch`, every rank runs the same pipeline. Within each block, rank r
forwards the calibration batches r, r + N, ... and Stage 1 and the refits of its share of the block's
matrices; what the others need is exchanged with `all_gather_object` and put back in one fixed order (the
batches' per-feature sums added in batch order, the layers in model order), so that every rank holds the same
model as a single process would, bit for bit where each rank runs as many threads as that process. Rank 0
writes. With one process every method is the identity.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def process_group_from_environment(device: str = "cpu") -> Iterator[bool]:
    """Within the block, this process is in the group that `torchrun` / `accelerate launch` describe in the
    environment (gloo on CPU, nccl on CUDA, joined here and left at the end unless one exists already); yields
    True when it is one of several processes."""
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        created = True
    try:
        yield dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    finally:
        if created:
            dist.destroy_process_group()


class Ranks:
    """This process's place among the ranks compressing one model, and the exchanges between them."""

    def __init__(self) -> None:
        active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if active else (0, 1)

    @property
    def writes(self) -> bool:
        return self.rank == 0

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order (the same list on every rank)."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def check_same_run(self, config: Any, calibration: torch.Tensor | None, n_layers: int) -> None:
        """Refuse ranks started differently, and more ranks than any block has matrices (ranks with no work)."""
        if self.world == 1:
            return
        settings = json.dumps(config.to_dict(), sort_keys=True)
        ids = b"" if calibration is None else calibration.cpu().numpy().tobytes()
        mine = hashlib.sha256(settings.encode() + ids).hexdigest()
        runs = self.gather((mine, settings))
        if any(h != runs[0][0] for h, _ in runs):
            first = json.loads(runs[0][1])
            differ = sorted({k for _, s in runs for k, v in json.loads(s).items() if first.get(k) != v})
            raise ValueError(
                f"the {self.world} ranks were started with different compression settings or calibration data "
                f"(differing config fields: {differ or 'none; the calibration tokens differ'}); start every rank "
                "with the same command"
            )
        if self.world > n_layers:
            raise ValueError(
                f"{self.world} ranks for decoder blocks of at most {n_layers} matrices: the ranks share each block's "
                f"matrices, so at most {n_layers} have work; start at most {n_layers} processes"
            )

    def broadcast_(self, tensors: list[torch.Tensor], src: int) -> None:
        """Overwrite `tensors` on every rank with rank `src`'s (same shapes everywhere)."""
        if self.world > 1:
            for t in tensors:
                dist.broadcast(t, src)

    def batches(self, starts: list[int]) -> list[int]:
        """The calibration batches (by start index) this rank forwards."""
        return starts[self.rank::self.world]

    def sums_in_batch_order(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Add the per-batch sums of every rank in global batch order (batch k is rank k % N's (k // N)-th)."""
        every = self.gather([p.cpu() for p in parts])
        ordered = [every[k % self.world][k // self.world] for k in range(sum(len(e) for e in every))]
        total = torch.zeros_like(ordered[0])
        for part in ordered:
            total += part
        return total

    def share(self, layers: dict[str, nn.Linear]) -> set[str]:
        """The matrices this rank decomposes: longest-processing-time-first over cost m n min(m, n), the same
        assignment on every rank."""
        if self.world == 1:
            return set(layers)
        load = [0] * self.world
        mine = set()
        for name, m in sorted(layers.items(), key=lambda kv: -kv[1].weight.numel() * min(kv[1].weight.shape)):
            rank = min(range(self.world), key=lambda r: (load[r], r))
            load[rank] += m.weight.numel() * min(m.weight.shape)
            if rank == self.rank:
                mine.add(name)
        return mine

    def merge(self, local: dict[str, Any], order: list[str]) -> list[Any]:
        """Every rank's `local` results, as one list in `order`."""
        merged: dict[str, Any] = {}
        for part in self.gather(local):
            merged.update(part)
        return [merged[name] for name in order]
