import pytest
import torch

from optimum_lrs import LowRankSparseConfig, robust_pca
from optimum_lrs.allocation import AllocationProblem, LayerCandidates, allocate
from optimum_lrs.allocation.base import kept_parameters


def candidates(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        LayerCandidates(f"layer{i}", m, n, robust_pca(torch.randn(m, n, generator=g)))
        for i, (m, n) in enumerate(shapes)
    ]


SHAPES = [(48, 32), (32, 48), (64, 32), (16, 32)]


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_uniform_meets_budget_and_shares_equally(ratio, fraction):
    cands = candidates(SHAPES)
    dense = sum(m * n for m, n in SHAPES)
    budget = round(ratio * dense)
    problem = AllocationProblem(cands, budget, LowRankSparseConfig(param_ratio=ratio, lowrank_fraction=fraction))
    result = allocate(problem)
    assert abs(kept_parameters(problem, result) - budget) <= 1e-3 * budget
    for c in cands:
        a = result[c.name]
        share = (a.rank * c.rank_cost + a.nnz) / c.dense_params
        assert share == pytest.approx(ratio, abs=0.02 + c.rank_cost / c.dense_params)
        if fraction == 0.0 and c.sparse_pool >= ratio * c.dense_params + 1:
            assert a.rank == 0  # all-sparse split, unless the sparse pool is too small


def test_uniform_moves_slack_when_a_sparse_pool_runs_dry():
    cands = candidates(SHAPES)
    # Force layer0 to have only 10 sparse candidates: its share must be made up elsewhere.
    sparse = cands[0].rpca.sparse
    keep = sparse.abs().flatten().topk(10).indices
    trimmed = torch.zeros_like(sparse).flatten()
    trimmed[keep] = sparse.flatten()[keep]
    cands[0].rpca.sparse = trimmed.view_as(sparse)
    budget = round(0.5 * sum(m * n for m, n in SHAPES))
    problem = AllocationProblem(cands, budget, LowRankSparseConfig(lowrank_fraction=0.0))
    result = allocate(problem)
    assert result["layer0"].nnz <= 10
    assert abs(kept_parameters(problem, result) - budget) <= 1e-3 * budget


def test_budget_larger_than_candidate_pool_is_refused():
    cands = candidates([(32, 32)])
    for c in cands:
        c.rpca.sparse.zero_()
        c.rpca.u, c.rpca.s, c.rpca.vh = c.rpca.u[:, :2], c.rpca.s[:2], c.rpca.vh[:2]
    problem = AllocationProblem(cands, 512, LowRankSparseConfig())
    with pytest.raises(ValueError, match="fewer than the budget"):
        allocate(problem)
