import pytest
import torch
from torch import nn

from safetensors.torch import load_file

from optimum_lrs import compress_, LowRankSparseConfig, RefitConfig, RPCAConfig
from optimum_lrs.allocation import LayerAllocation
from optimum_lrs.extract import build_layer
from optimum_lrs.stage1.decompose import decompose, rpca_rank_cap

from .conftest import tiny_llama


@pytest.fixture
def linear():
    torch.manual_seed(0)
    layer = nn.Linear(40, 56, bias=True)
    return layer


@pytest.mark.parametrize("keep", [LayerAllocation(0, 300), LayerAllocation(4, 0), LayerAllocation(6, 500)])
def test_extraction_keeps_top_triplets_and_entries(linear, keep):
    cfg = LowRankSparseConfig(refit=RefitConfig(values="rpca", selection="allocation"))
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
        cfg = LowRankSparseConfig(refit=RefitConfig(values=mode, selection="allocation"))
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
    cfg = LowRankSparseConfig(refit=RefitConfig(selection=selection))
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


def test_default_capped_stage1_builds_the_same_allocation_as_the_uncapped_one(tmp_path):
    """`RPCAConfig.max_rank="auto"` caps uniform's Stage 1 at the rank it keeps: the same counts in every layer,
    and after the refits each layer within a few percent of the error an uncapped Stage 1 leads to."""
    dense = tiny_llama()
    kw = dict(param_ratio=0.5, activation_aware=False)
    capped = compress_(tiny_llama(), LowRankSparseConfig(cache_dir=str(tmp_path / "capped"), **kw))
    full = compress_(tiny_llama(), LowRankSparseConfig(cache_dir=str(tmp_path / "full"), **kw, rpca=RPCAConfig(max_rank=None)))
    # Stage 1 itself ran capped: every cached RPCA has at most 4 triplets (the caps of 64 x 64 and 64 x 160
    # at 50% are 3 and 4), where the uncapped ones keep dozens.
    ranks = {d: [load_file(f)["s"].numel() for f in (tmp_path / d).iterdir()] for d in ("capped", "full")}
    assert len(ranks["capped"]) == len(ranks["full"]) > 0
    assert max(ranks["capped"]) <= 4 < min(ranks["full"])
    entries, full_entries = capped.config.quantization_config.compressed.modules, full.config.quantization_config.compressed.modules
    assert entries.keys() == full_entries.keys() and entries
    for name, entry in entries.items():
        assert (entry["rank"], entry["nnz"]) == (full_entries[name]["rank"], full_entries[name]["nnz"])
        weight = dense.get_submodule(name).weight
        cap = rpca_rank_cap(LowRankSparseConfig(**kw), tuple(weight.shape), 0.5)
        assert cap is not None and entry["rank"] <= cap < min(weight.shape) // 4
        errors = [torch.linalg.matrix_norm(m.get_submodule(name).dense_weight() - weight) / torch.linalg.matrix_norm(weight)
                  for m in (capped, full)]
        assert errors[0] < 1.05 * errors[1], name
