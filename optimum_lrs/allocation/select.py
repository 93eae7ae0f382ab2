"""Keep the best-scored candidates of all layers until the budget is met exactly."""

from __future__ import annotations

import torch

from ..stage1.candidates import LayerCandidates
from .base import LayerAllocation


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
    at flat position `sparse_positions[l][j]`. Ties keep the earlier candidate (stable sort). No layer
    keeps more than its dense size: a candidate that would take its layer past m * n is skipped
    (storing more than the dense matrix is pure waste), unless the budget cannot be met that way.
    """
    scores, costs, sizes = [], [], []
    for c, r, s in zip(candidates, rank_scores, sparse_scores):
        scores += [r.double(), s.double()]
        costs += [torch.full((r.numel(),), c.rank_cost, dtype=torch.long), torch.ones(s.numel(), dtype=torch.long)]
        sizes += [r.numel(), s.numel()]
    flat_scores, flat_costs = torch.cat(scores), torch.cat(costs)
    order = flat_scores.argsort(descending=True, stable=True)
    capped = order[_within_layer_cap(order, flat_costs, candidates, sizes)]
    if int(flat_costs[capped].sum()) >= budget:  # else the budget needs some layer above its dense size
        order = capped
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


def _within_layer_cap(order: torch.Tensor, costs: torch.Tensor, candidates: list[LayerCandidates], sizes: list[int]) -> torch.Tensor:
    """Mask over `order`: True where the candidate's layer, counting its candidates in this order up to and
    including this one, stays within the layer's dense parameter count."""
    layer_of = torch.repeat_interleave(torch.arange(len(candidates)).repeat_interleave(2), torch.tensor(sizes))
    caps = torch.tensor([c.dense_params for c in candidates])
    layers = layer_of[order]
    by_layer = layers.argsort(stable=True)  # keeps the score order inside each layer
    running = costs[order][by_layer].cumsum(0)
    starts = torch.zeros(len(candidates) + 1, dtype=torch.long)
    starts[1:] = torch.bincount(layers, minlength=len(candidates)).cumsum(0)
    before = torch.cat([torch.zeros(1, dtype=running.dtype), running])[starts[:-1]]  # spent before each layer's block
    within = torch.empty_like(running)
    within[by_layer] = running - before[layers[by_layer]]
    return within <= caps[layers]
