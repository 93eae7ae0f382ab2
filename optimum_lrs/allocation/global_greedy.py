"""`allocation="global_greedy"`: one ranking of every candidate of every layer, by error removed per parameter.

Keeping singular triplet i of W removes sigma_i^2 from ||W - W~||_F^2; keeping sparse entry (i, j)
removes about S_ij^2. Divided by ||W||_F^2 (so that layers of different scale compare) and by the
candidate's cost (m + n or 1), this ranks all candidates at once; the best are kept until the budget.
It is the cheap global baseline that CAP's policy-gradient step has to beat.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import AllocationConfig, AllocationProblem, LayerAllocation, register_allocator
from .select import keep_best


@dataclass
class GlobalGreedyAllocation(AllocationConfig):
    """One ranking of all candidates by error removed per parameter; `lowrank_fraction` serves only where a
    pipeline needs provisional uniform counts (the sequential pipeline's blocks before the allocation)."""

    name = "global_greedy"


@register_allocator(GlobalGreedyAllocation)
def allocate_global_greedy(problem: AllocationProblem) -> dict[str, LayerAllocation]:
    positions = [c.sparse_positions() for c in problem.candidates]
    scores = [c.energy_scores(pos) for c, pos in zip(problem.candidates, positions)]
    return keep_best(problem.candidates, [r for r, _ in scores], [s for _, s in scores], positions, problem.budget)
