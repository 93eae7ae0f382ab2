"""`allocation="uniform"`: every matrix keeps the same fraction of its parameters.

The named baseline against which global allocation is judged. Each matrix spends `lowrank_fraction`
of its share on its top singular triplets and the rest on its largest sparse entries; where one pool
runs dry the other takes up the slack, and what a layer cannot hold goes to layers that can.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .base import (
    AllocationConfig,
    AllocationProblem,
    LayerAllocation,
    LayerCandidates,
    kept_parameters,
    register_allocator,
)

if TYPE_CHECKING:
    from ..config import RefitConfig


def _fill(c: LayerCandidates, share: int, lowrank_fraction: float) -> LayerAllocation:
    """Split `share` parameters of one matrix between rank and sparse entries."""
    rank = min(c.rank_pool, int(lowrank_fraction * share) // c.rank_cost)
    nnz = share - rank * c.rank_cost
    if nnz > c.sparse_pool:  # not enough sparse entries: spend the rest on more rank (may overshoot < m + n)
        rank = min(c.rank_pool, rank + -(-(nnz - c.sparse_pool) // c.rank_cost))
        nnz = max(0, min(c.sparse_pool, share - rank * c.rank_cost))
    return LayerAllocation(rank, nnz)


def uniform_rank(c: LayerCandidates, ratio: float, lowrank_fraction: float) -> int:
    """The rank `allocate_uniform` gives this layer at `ratio` (with or without the one-parameter rounding
    remainder; settling the budget changes only sparse counts): triplets beyond it can be freed after Stage 1."""
    share = int(ratio * c.dense_params)
    return max(_fill(c, share, lowrank_fraction).rank, _fill(c, share + 1, lowrank_fraction).rank)


def stage1_rank_cap(shape: tuple[int, int], ratio: float, lowrank_fraction: float) -> int:
    """The rank `uniform_rank` gives a matrix of this shape when its pools are large enough, known before
    Stage 1: the cap of `RPCAConfig(max_rank="auto")`. At least 1, because the first RPCA iteration reads ||W||_2."""
    rows, cols = shape
    return max(1, int(lowrank_fraction * (int(ratio * rows * cols) + 1)) // (rows + cols))


def uniform_shares(sizes: dict[str, int], budget: int) -> dict[str, int]:
    """Each matrix's share of `budget` (`sizes`: dense parameter counts, in layer order): the same ratio for
    all, the rounding remainder handed out one parameter at a time so that the shares add up to the budget."""
    ratio = budget / sum(sizes.values())
    shares = {name: int(ratio * size) for name, size in sizes.items()}
    for name in list(shares)[: budget - sum(shares.values())]:
        shares[name] += 1
    return shares


@dataclass
class UniformAllocation(AllocationConfig):
    """Every matrix keeps `param_ratio` of its parameters, `lowrank_fraction` of them as rank."""

    name = "uniform"
    per_layer = True

    def reads_uniform_rank(self, refit: RefitConfig) -> bool:
        return refit.selection != "allocation"  # RPCA's own S keeps positions beyond the uniform rank's pick


@register_allocator(UniformAllocation)
def allocate_uniform(problem: AllocationProblem) -> dict[str, LayerAllocation]:
    shares = problem.shares or uniform_shares({c.name: c.dense_params for c in problem.candidates}, problem.budget)
    allocation = {c.name: _fill(c, shares[c.name], problem.config.allocation.lowrank_fraction) for c in problem.candidates}
    return settle(problem, allocation)


def settle(problem: AllocationProblem, allocation: dict[str, LayerAllocation]) -> dict[str, LayerAllocation]:
    """Meet the budget exactly: what the layers miss (or overshoot) is settled in sparse entries of layers
    with room, in layer order. Explicit `sparse_ids` are dropped where the count changes."""
    missing = problem.budget - kept_parameters(problem, allocation)
    for c in problem.candidates:
        if missing == 0:
            break
        a = allocation[c.name]
        nnz = min(c.sparse_pool, max(0, a.nnz + missing))
        missing -= nnz - a.nnz
        if nnz != a.nnz:
            allocation[c.name] = replace(a, nnz=nnz, sparse_ids=None)
    return allocation
