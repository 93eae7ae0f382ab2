import pytest
import torch

from optimum_lrs import LowRankSparseConfig, LowRankSparseLinear, robust_pca, UniformAllocation
from optimum_lrs.allocation import AllocationProblem, LayerCandidates, allocate
from optimum_lrs.allocation.base import kept_parameters
from optimum_lrs.allocation.uniform import uniform_rank


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
    problem = AllocationProblem(cands, budget, LowRankSparseConfig(param_ratio=ratio, allocation=UniformAllocation(lowrank_fraction=fraction)))
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
    problem = AllocationProblem(cands, budget, LowRankSparseConfig(allocation=UniformAllocation(lowrank_fraction=0.0)))
    result = allocate(problem)
    assert result["layer0"].nnz <= 10
    assert abs(kept_parameters(problem, result) - budget) <= 1e-3 * budget


@pytest.mark.parametrize("dry", [False, True])
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("fraction", [0.0, 0.2, 1.0])
def test_uniform_never_exceeds_the_rank_compaction_keeps(ratio, fraction, dry):
    """compress_model frees triplets beyond `uniform_rank` before uniform allocation: it must never want them,
    even when a sparse pool runs dry and the layer's share goes to rank instead."""
    cands = candidates(SHAPES)
    if dry:
        flat = cands[0].rpca.sparse.flatten()
        flat[flat.abs().argsort()[10:]] = 0.0
    budget = round(ratio * sum(m * n for m, n in SHAPES))
    full = allocate(AllocationProblem(cands, budget, LowRankSparseConfig(param_ratio=ratio, allocation=UniformAllocation(lowrank_fraction=fraction))))
    for c in cands:
        keep = uniform_rank(c, budget / sum(m * n for m, n in SHAPES), fraction)
        assert full[c.name].rank <= keep
        c.compact(keep)
    compacted = allocate(AllocationProblem(cands, budget, LowRankSparseConfig(param_ratio=ratio, allocation=UniformAllocation(lowrank_fraction=fraction))))
    assert {k: (a.rank, a.nnz) for k, a in compacted.items()} == {k: (a.rank, a.nnz) for k, a in full.items()}


def test_budget_larger_than_candidate_pool_is_refused():
    cands = candidates([(32, 32)])
    for c in cands:
        c.rpca.sparse.zero_()
        c.rpca.u, c.rpca.s, c.rpca.vh = c.rpca.u[:, :2], c.rpca.s[:2], c.rpca.vh[:2]
    problem = AllocationProblem(cands, 512, LowRankSparseConfig())
    with pytest.raises(ValueError, match="fewer than the budget"):
        allocate(problem)


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.6])
def test_global_greedy_meets_budget_and_prefers_the_more_compressible_layer(ratio):
    g = torch.Generator().manual_seed(3)
    low_rank = torch.randn(48, 2, generator=g) @ torch.randn(2, 40, generator=g)  # compressible: rank 2
    noisy = torch.randn(48, 40, generator=g)  # incompressible
    cands = [LayerCandidates("low_rank", 48, 40, robust_pca(low_rank)), LayerCandidates("noise", 48, 40, robust_pca(noisy))]
    budget = round(ratio * 2 * 48 * 40)
    problem = AllocationProblem(cands, budget, LowRankSparseConfig(allocation="global_greedy"))
    result = allocate(problem)
    assert kept_parameters(problem, result) == budget
    assert result["low_rank"].rank >= 2  # its two triplets carry all its energy: kept first
    for c in cands:
        a = result[c.name]
        assert a.rank_ids.numel() == a.rank and a.sparse_ids.numel() == a.nnz
        assert torch.equal(a.rank_ids, torch.arange(a.rank))  # by sigma^2: a prefix of the spectrum


def test_keep_best_is_exact_for_random_costs_and_budgets():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from optimum_lrs.allocation.select import keep_best

    @settings(max_examples=60, deadline=None)
    @given(
        layers=st.lists(st.tuples(st.integers(2, 9), st.integers(0, 5), st.integers(0, 30)), min_size=1, max_size=4),
        fraction=st.floats(0.0, 1.0),
        seed=st.integers(0, 1000),
    )
    def check(layers, fraction, seed):
        g = torch.Generator().manual_seed(seed)
        cands, rank_scores, sparse_scores, positions = [], [], [], []
        for i, (cost, n_rank, n_sparse) in enumerate(layers):
            cand = LayerCandidates(f"l{i}", cost - 1, 1, None)  # rank cost = (cost - 1) + 1
            cands.append(cand)
            rank_scores.append(torch.rand(n_rank, generator=g))
            sparse_scores.append(torch.rand(n_sparse, generator=g))
            positions.append(torch.arange(n_sparse))
        pool = sum(c * r + n for c, r, n in layers)
        budget = int(fraction * pool)
        result = keep_best(cands, rank_scores, sparse_scores, positions, budget)
        kept = sum(result[c.name].rank * c.rank_cost + result[c.name].nnz for c in cands)
        largest = max(c for c, _, _ in layers)
        assert kept <= budget
        # Exact, unless the cost-1 candidates ran out while the gap was smaller than one triplet.
        all_sparse_kept = all(result[f"l{i}"].nnz == n for i, (_, _, n) in enumerate(layers))
        assert kept == budget or (all_sparse_kept and budget - kept < largest)

    check()


def test_global_greedy_never_keeps_more_than_a_layers_dense_size():
    from optimum_lrs import compress_

    from .conftest import tiny_llama

    model = compress_(tiny_llama(), LowRankSparseConfig(param_ratio=0.6, allocation="global_greedy", activation_aware=False))
    layers = [m for m in model.modules() if isinstance(m, LowRankSparseLinear)]
    assert max(m.num_parameters / (m.in_features * m.out_features) for m in layers) <= 1.0
