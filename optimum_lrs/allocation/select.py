"""Keep the best-scored candidates of all layers until the budget is met exactly."""

from __future__ import annotations

import torch

from .base import LayerAllocation, LayerCandidates


def keep_best(
    candidates: list[LayerCandidates],
    rank_scores: list[torch.Tensor],
    sparse_scores: list[torch.Tensor],
    sparse_positions: list[torch.Tensor],
    budget: int,
) -> dict[str, LayerAllocation]:
    """Greedy by score over every candidate of every layer, then exact: the leftover budget, smaller
    than the next triplet's cost, is filled with the next best sparse entries (cost 1 each).

    `rank_scores[l][i]` scores triplet i of layer l; `sparse_scores[l][j]` scores the sparse candidate
    at flat position `sparse_positions[l][j]`. Ties keep the earlier candidate (stable sort).
    """
    scores, costs, sizes = [], [], []
    for c, r, s in zip(candidates, rank_scores, sparse_scores):
        scores += [r.double(), s.double()]
        costs += [torch.full((r.numel(),), c.rank_cost, dtype=torch.long), torch.ones(s.numel(), dtype=torch.long)]
        sizes += [r.numel(), s.numel()]
    flat_scores, flat_costs = torch.cat(scores), torch.cat(costs)
    order = flat_scores.argsort(descending=True, stable=True)
    spent = flat_costs[order].cumsum(0)
    n_prefix = int(torch.searchsorted(spent, budget, right=True))
    left = budget - (int(spent[n_prefix - 1]) if n_prefix else 0)
    rest = order[n_prefix:]
    chosen = torch.cat([order[:n_prefix], rest[flat_costs[rest] == 1][:left]])
    keep = torch.zeros(flat_scores.numel(), dtype=torch.bool)
    keep[chosen] = True
    parts = keep.split(sizes)
    allocation = {}
    for c, rank_part, sparse_part, positions in zip(candidates, parts[0::2], parts[1::2], sparse_positions):
        rank_ids = rank_part.nonzero().squeeze(1)
        sparse_ids = positions[sparse_part]
        allocation[c.name] = LayerAllocation(rank_ids.numel(), sparse_ids.numel(), rank_ids, sparse_ids)
    return allocation
