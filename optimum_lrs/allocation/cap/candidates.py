"""One layer's CAP candidates: singular triplets and sparse positions best first, and the orders that make any
prefix of the sparse candidates one comparison; `PoolStore` keeps them on disk for CAP over streamed blocks."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ...nn.storage import index_dtype_for
from ...stage1.candidates import LayerCandidates
from ...stage1.rpca import alternating_refit, top_triplets
from ..base import AllocationProblem, LayerAllocation


class PlaceMap:
    """Which sparse candidates a prefix of `nnz` keeps, for any order: each position's place in it as a dense
    int32 map (4 bytes per weight), so that a sample's kept entries are one comparison instead of a gather and
    a scatter (on SmolLM2 these took as long as the forward itself)."""

    def __init__(self, positions: torch.Tensor, shape: tuple[int, int]):
        place = torch.full((shape[0] * shape[1],), torch.iinfo(torch.int32).max, dtype=torch.int32, device=positions.device)
        place[positions] = torch.arange(positions.numel(), dtype=torch.int32, device=positions.device)
        self.place, self.count = place.view(shape), positions.numel()

    @classmethod
    def restore(cls, place: torch.Tensor, count: int) -> PlaceMap:
        """The map as `PoolStore` saved it."""
        self = cls.__new__(cls)
        self.place, self.count = place, count
        return self

    def kept(self, nnz: int) -> torch.Tensor:
        return self.place < nnz


class RowLevels:
    """The same for the per-row order of refit candidates (`refit.selection="row"`), in 2 bytes per weight.

    That order is by levels: level j holds every row's (j+1)-th largest |R| (R = target - u v, the refit's
    residual), levels in turn, within a level the rows by that value. A prefix is whole levels plus the best
    rows of one more. Kept: each entry's level (its place in its row), and u, v and the weight, from which
    the partly kept level's m values are recomputed when a sample needs them.
    """

    def __init__(self, level: torch.Tensor, count: int, weight: torch.Tensor, scale: torch.Tensor | None,
                 u: torch.Tensor, v: torch.Tensor):
        self.level, self.count, self.weight, self.scale, self.u, self.v = level, count, weight, scale, u, v

    @classmethod
    def from_magnitude(cls, magnitude: torch.Tensor, count: int, weight: torch.Tensor, scale: torch.Tensor | None,
                       u: torch.Tensor, v: torch.Tensor) -> RowLevels:
        """The levels of the entries of `magnitude` (|R|), each row sorted."""
        rows, cols = magnitude.shape
        by_size = magnitude.sort(dim=1, descending=True).indices
        dtype = index_dtype_for(cols - 1)
        ranks = torch.arange(cols, dtype=dtype, device=magnitude.device).expand(rows, cols)
        level = torch.empty(rows, cols, dtype=dtype, device=magnitude.device).scatter_(1, by_size, ranks)
        return cls(level, count, weight, scale, u, v)

    def kept(self, nnz: int) -> torch.Tensor:
        rows = self.level.shape[0]
        whole, extra = divmod(nnz, rows)
        mask = self.level < whole
        if extra:
            cols = (self.level == whole).to(torch.uint8).argmax(1)  # each row's entry at level `whole`
            target = self.weight[torch.arange(rows, device=cols.device), cols].float()
            if self.scale is not None:
                target = target * self.scale[cols]
            value = (target - (self.u * self.v[:, cols].t()).sum(1)).abs()
            best = value.argsort(descending=True, stable=True)[:extra]
            mask[best, cols[best]] = True
        return mask


class CandidatePool:
    """One layer's candidates: triplets (u, s, vh) and sparse positions best first. By default Stage 1's:
    RPCA's triplets and S's non-zeros, largest |S| first. Refit candidates come with their sparse order as a
    `PlaceMap` / `RowLevels` (`order`) instead of a position list."""

    def __init__(self, c: LayerCandidates, triplets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 order: PlaceMap | RowLevels | None = None):
        self.c = c
        self.u, self.s, self.vh = triplets if triplets is not None else (c.rpca.u, c.rpca.s, c.rpca.vh)
        self.order = order
        self.positions = c.sparse_positions() if order is None else None
        self.sparse_count = self.positions.numel() if order is None else order.count

    def use_prefixes(self) -> None:
        """For samples that keep leading candidates (the count policies): the sparse order as a `PlaceMap`
        in place of the int64 position list, and the triplets as factors u sqrt(s), sqrt(s) vh."""
        if self.order is None:
            self.order, self.positions = PlaceMap(self.positions, (self.c.out_features, self.c.in_features)), None
        root = self.s.sqrt()
        self.u, self.vh = self.u * root, root[:, None] * self.vh

    @property
    def sizes(self) -> tuple[int, int]:
        """How many triplets and sparse entries a sample may keep."""
        return min(self.c.rank_pool, self.s.numel()), min(self.c.sparse_pool, self.sparse_count)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(u sqrt(s), sqrt(s) vh) of the `rank` leading triplets (after `use_prefixes`)."""
        return self.u[:, :rank], self.vh[:rank]


def refit_candidates(problem: AllocationProblem, c: LayerCandidates, dense: nn.Linear, uniform: LayerAllocation) -> CandidatePool:
    """Candidates that reproduce the final layer, not Stage 1's split: `build_layer` re-picks the sparse entries
    and refits the low-rank part, which changes what a count is worth (on SmolLM2 at 50%, CAP on RPCA's own
    candidates lowered their loss 5.50 -> 5.13 while the final model's went 4.40 -> 4.45).

    The layer is refit at the uniform allocation's counts (as `build_layer` would, but stopping
    `CapAllocation.refine_iterations` short of `RefitConfig.iterations`: the final layer does those); the triplets are the SVD
    of the weight minus that sparse part, the sparse candidates the entries of the weight minus the rank-r
    part, ordered so that every prefix is what the selection keeps (per row: each row's k-th largest entries
    before any row's (k+1)-th; `RowLevels`). At the uniform counts the masked layer is the final uniform layer. The pools
    reach twice the uniform counts: the policy's samples move counts by a few percent.
    """
    cfg = problem.config
    weight = dense.weight.detach().float()
    target = weight if c.column_scale is None else weight * c.column_scale
    root = c.rpca.s[: uniform.rank].sqrt()
    u, v = c.rpca.u[:, : uniform.rank] * root, root[:, None] * c.rpca.vh[: uniform.rank]
    if problem.consumable:
        c.compact(0)  # Stage 1's triplets were needed only as this start (the pool sizes stay)
    per_row = cfg.refit.selection == "row"
    iterations = cfg.refit.iterations - cfg.allocation.refine_iterations  # the rest run at the allocated counts
    u, v, kept = alternating_refit(target, u, v, uniform.nnz, iterations, per_row, cfg.rpca.solver)
    resid = target - u @ v
    sparse = torch.zeros_like(target).flatten()
    sparse[kept] = resid.flatten()[kept]
    rank_pool = min(min(target.shape), 2 * uniform.rank + 8)
    # Four power steps: prefixes up to 1.25x the uniform rank within 2e-4 of the SVD's error (two: 1e-3), 4x faster.
    su, ss, svh = top_triplets(target - sparse.view_as(target), rank_pool, warm=v, solver=cfg.rpca.solver, power_steps=4)
    sparse_pool = min(target.numel(), 2 * uniform.nnz + target.shape[0])
    magnitude = resid.abs()
    if per_row:
        order = RowLevels.from_magnitude(magnitude, sparse_pool, dense.weight.detach(), c.column_scale, u, v)
    else:
        order = PlaceMap(magnitude.flatten().argsort(descending=True, stable=True)[:sparse_pool], target.shape)
    return CandidatePool(c, (su.contiguous(), ss, svh.contiguous()), order)


class PoolStore:
    """Prefix candidate pools on disk, one safetensors file per layer (with the layer's input second moment, if
    any), so that CAP over streamed blocks holds one block's pools at a time. The directory is the caller's."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.sizes: dict[str, tuple[int, int]] = {}
        self.files: dict[str, Path] = {}

    def put(self, pool: CandidatePool) -> None:
        """Save `pool` (after `use_prefixes`) and its layer's `input_moment`, which leaves memory."""
        c, order = pool.c, pool.order
        tensors = {"u": pool.u, "s": pool.s, "vh": pool.vh}
        if isinstance(order, RowLevels):
            tensors.update(level=order.level, order_u=order.u, order_v=order.v)
        else:
            tensors["place"] = order.place
        if c.input_moment is not None:
            tensors["input_moment"] = c.input_moment
        path = self.directory / f"{len(self.files):05d}.safetensors"
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, path,
                  metadata={"layer": c.name, "count": str(order.count)})
        self.files[c.name], self.sizes[c.name] = path, pool.sizes
        c.input_moment = None

    def get(self, c: LayerCandidates, dense: nn.Linear, moment: bool = False) -> CandidatePool:
        """Layer `c`'s pool, ready for prefix samples; with `moment`, `c.input_moment` is restored too."""
        with safe_open(self.files[c.name], framework="pt", device=str(dense.weight.device)) as f:
            t = {k: f.get_tensor(k) for k in f.keys() if moment or k != "input_moment"}
            count = int(f.metadata()["count"])
        if moment:
            c.input_moment = t.get("input_moment")
        if "level" in t:
            order = RowLevels(t["level"], count, dense.weight.detach(), c.column_scale, t["order_u"], t["order_v"])
        else:
            order = PlaceMap.restore(t["place"], count)
        return CandidatePool(c, (t["u"], t["s"], t["vh"]), order)
