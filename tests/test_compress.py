import pytest
import torch
from torch import nn

from optimum_lrs import LowRankSparseConfig
from optimum_lrs.allocation import LayerAllocation
from optimum_lrs.compress import build_layer, decompose


@pytest.fixture
def linear():
    torch.manual_seed(0)
    layer = nn.Linear(40, 56, bias=True)
    return layer


@pytest.mark.parametrize("keep", [LayerAllocation(0, 300), LayerAllocation(4, 0), LayerAllocation(6, 500)])
def test_extraction_keeps_top_triplets_and_entries(linear, keep):
    cfg = LowRankSparseConfig(sparse_values="rpca", sparse_selection="allocation")
    cands = decompose("x", linear, cfg)
    layer = build_layer(cands, keep, linear, cfg)
    assert (layer.rank, layer.nnz) == (keep.rank, keep.nnz)
    r = cands.rpca
    low = (r.u[:, : keep.rank] * r.s[: keep.rank]) @ r.vh[: keep.rank]
    sparse = r.sparse.flatten()
    top = sparse.abs().topk(keep.nnz).indices
    expected = torch.zeros_like(sparse)
    expected[top] = sparse[top]
    assert torch.allclose(layer.dense_weight(), low + expected.view_as(low), atol=1e-5)
    assert torch.equal(layer.bias, linear.bias)


def test_residual_values_are_exact_on_the_support_and_never_worse(linear):
    keep = LayerAllocation(5, 600)
    errors = {}
    for mode in ("rpca", "residual"):
        cfg = LowRankSparseConfig(sparse_values=mode, sparse_selection="allocation")
        layer = build_layer(decompose("x", linear, cfg), keep, linear, cfg)
        errors[mode] = torch.linalg.matrix_norm(linear.weight - layer.dense_weight()).item()
        if mode == "residual":
            csr = layer.sparse_matrix().to_dense() != 0
            assert torch.allclose(layer.dense_weight()[csr], linear.weight[csr], atol=1e-5)
    assert errors["residual"] < errors["rpca"]


@pytest.mark.parametrize("selection", ["row", "matrix"])
def test_compacting_the_pools_changes_nothing_when_entries_are_re_picked(linear, selection):
    """Uniform allocation frees S's dense copy and unreachable triplets after Stage 1 (memory); the built
    layer must not change."""
    cfg = LowRankSparseConfig(sparse_selection=selection)
    cands = decompose("x", linear, cfg)
    pool = cands.sparse_pool
    keep = LayerAllocation(3, 700)
    before = build_layer(cands, keep, linear, cfg)
    rank_pool = cands.rank_pool
    cands.compact(keep_rank=3)
    assert cands.rpca.sparse is None and cands.sparse_pool == pool > 700 and cands.rank_pool == rank_pool > 3
    assert cands.rpca.rank == 3
    after = build_layer(cands, keep, linear, cfg)
    for name, tensor in before.state_dict().items():
        assert torch.equal(tensor, after.state_dict()[name]), name
