import pytest
import torch

from optimum_lrs import LowRankSparseLinear
from optimum_lrs.nn.storage import DENSE_REBUILD_TOKENS, index_dtype_for, pack_bits, unpack_bits


def random_factors(out_f=48, in_f=40, rank=5, density=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(out_f, rank, generator=g), torch.randn(rank, in_f, generator=g)
    s = torch.randn(out_f, in_f, generator=g) * (torch.rand(out_f, in_f, generator=g) < density)
    return u, v, s, torch.randn(out_f, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("x_shape", [(7, 40), (3, 5, 40), (2, DENSE_REBUILD_TOKENS, 40)])
@pytest.mark.parametrize("sparse_format", ["csr", "bitmask"])
def test_forward_matches_dense_formula(dtype, with_bias, x_shape, sparse_format):
    u, v, s, b = random_factors()
    layer = LowRankSparseLinear.from_factors(u, v, s, b if with_bias else None, dtype=dtype)
    layer = layer.with_sparse_format(sparse_format)
    assert layer.sparse_format == sparse_format
    x = torch.randn(*x_shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    uq, vq, sq = (t.to(dtype).float() for t in (u, v, s))  # the same rounded factors, in float32
    expected = x.float() @ (uq @ vq + sq).t() + (b.to(dtype).float() if with_bias else 0)
    got = layer(x)
    assert got.dtype == dtype and got.shape == (*x_shape[:-1], 48)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(got.float(), expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_short_inputs_use_the_sparse_kernel_not_a_dense_weight(monkeypatch):
    u, v, s, _ = random_factors()
    layer = LowRankSparseLinear.from_factors(u, v, s)
    monkeypatch.setattr(LowRankSparseLinear, "dense_weight", lambda self: pytest.fail("forward densified W"))
    monkeypatch.setattr(torch.Tensor, "to_dense", lambda self, *a, **k: pytest.fail("forward densified S"))
    monkeypatch.setattr(LowRankSparseLinear, "_rebuilt_weight",
                        lambda self, dtype=None: pytest.fail("forward rebuilt W"))
    layer(torch.randn(DENSE_REBUILD_TOKENS - 1, 40))


def test_training_inputs_stay_on_the_sparse_kernel_however_long(monkeypatch):
    """A rebuilt dense weight would be saved for backward in every layer: inputs needing a gradient never
    take that path, even above DENSE_REBUILD_TOKENS; without a gradient they do."""
    u, v, s, _ = random_factors()
    layer = LowRankSparseLinear.from_factors(u, v, s)
    x = torch.randn(DENSE_REBUILD_TOKENS, 40)
    expected = x @ layer.dense_weight().t()
    calls = []
    original = LowRankSparseLinear._rebuilt_weight
    monkeypatch.setattr(LowRankSparseLinear, "_rebuilt_weight",
                        lambda self, dtype=None: calls.append(1) or original(self, dtype))
    out = layer(x.clone().requires_grad_(True))
    assert not calls and torch.allclose(out, expected, atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-4) and calls == [1]


def test_counts_dtypes_and_no_weight_attribute():
    u, v, s, b = random_factors(out_f=48, in_f=40, rank=5)
    layer = LowRankSparseLinear.from_factors(u, v, s, b)
    nnz = int((s != 0).sum())
    assert (layer.in_features, layer.out_features, layer.rank, layer.nnz) == (40, 48, 5, nnz)
    assert layer.num_parameters == 5 * (40 + 48) + nnz
    assert layer.sparse_col_indices.dtype == torch.int16
    assert layer.sparse_row_offsets.dtype == index_dtype_for(nnz)
    expected_bytes = 4 * (5 * 88 + nnz + 48) + 2 * nnz + layer.sparse_row_offsets.element_size() * 49
    assert layer.nbytes == expected_bytes
    assert not hasattr(layer, "weight")
    assert torch.allclose(layer.dense_weight(), u @ v + s, atol=1e-5)
    assert not any(p.requires_grad for p in layer.parameters())


def test_index_dtype_widths():
    assert index_dtype_for(32767) == torch.int16
    assert index_dtype_for(32768) == torch.int32
    assert index_dtype_for(2**31) == torch.int64


def test_degenerate_and_bad_inputs():
    u, v, s, _ = random_factors()
    zero_rank = LowRankSparseLinear.from_factors(u[:, :0], v[:0], s)
    assert torch.allclose(zero_rank(torch.eye(40)), s.t(), atol=1e-6)
    no_sparse = LowRankSparseLinear.from_factors(u, v, torch.zeros_like(s))
    assert no_sparse.nnz == 0 and torch.allclose(no_sparse(torch.eye(40)), (u @ v).t(), atol=1e-5)
    with pytest.raises(ValueError, match="incompatible"):
        LowRankSparseLinear.from_factors(u, v[:3], s)
    with pytest.raises(ValueError, match="last dimension"):
        no_sparse(torch.randn(2, 39))
    with pytest.raises(ValueError, match="exceeds"):
        LowRankSparseLinear(4, 4, 1, 17)


def test_from_csr_keeps_explicit_zeros_and_checks_arrays():
    u, v = torch.randn(3, 1), torch.randn(1, 4)
    rows, cols = torch.tensor([0, 1, 1, 2]), torch.tensor([2, 0])
    layer = LowRankSparseLinear.from_csr(u, v, rows, cols, torch.tensor([0.0, 5.0]))
    assert layer.nnz == 2
    expected = u @ v
    expected[2, 0] += 5.0
    assert torch.allclose(layer.dense_weight(), expected)
    with pytest.raises(ValueError, match="invalid CSR"):
        LowRankSparseLinear.from_csr(u, v, rows, torch.tensor([2, 4]), torch.ones(2))
    with pytest.raises(ValueError, match="invalid CSR"):
        LowRankSparseLinear.from_csr(u, v, torch.tensor([0, 1, 1, 3]), cols, torch.ones(2))


@pytest.mark.parametrize("sparse_format", ["csr", "bitmask"])
def test_input_gradient_through_the_sparse_part_matches_dense(sparse_format):
    g = torch.Generator().manual_seed(4)
    dense_s = torch.randn(9, 7, generator=g) * (torch.rand(9, 7, generator=g) < 0.4)
    layer = LowRankSparseLinear.from_factors(torch.randn(9, 2, generator=g), torch.randn(2, 7, generator=g), dense_s)
    layer = layer.with_sparse_format(sparse_format)
    x = torch.randn(3, 5, 7, generator=g, requires_grad=True)
    layer(x).square().sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    (ref @ layer.dense_weight().t()).square().sum().backward()
    assert torch.allclose(x.grad, ref.grad, atol=1e-4)
    assert all(p.grad is None for p in layer.parameters())  # the factors stay frozen


@pytest.mark.parametrize(("rows", "cols"), [(3, 1), (5, 8), (4, 13), (2, 64)])
def test_bit_packing_round_trips(rows, cols):
    mask = torch.rand(rows, cols, generator=torch.Generator().manual_seed(cols)) < 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, -(-cols // 8))
    assert torch.equal(unpack_bits(packed, cols), mask)
    # Column j is bit j % 8 of byte j // 8, least significant bit first.
    one = torch.zeros(1, 10, dtype=torch.bool)
    one[0, 9] = True
    assert pack_bits(one).tolist() == [[0, 2]]


@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_bitmask_layout_holds_the_same_matrix_in_fewer_bytes_when_dense(density):
    u, v, s, b = random_factors(out_f=48, in_f=44, rank=3, density=density)
    csr = LowRankSparseLinear.from_factors(u, v, s, b)
    bitmask = csr.with_sparse_format("bitmask")
    assert not hasattr(bitmask, "sparse_col_indices") and bitmask.sparse_bitmask.shape == (48, 6)
    assert bitmask.csr_problem() is None and bitmask.nnz == csr.nnz
    assert torch.equal(bitmask.dense_weight(), csr.dense_weight())
    back = bitmask.with_sparse_format("csr")
    assert torch.equal(back.sparse_col_indices, csr.sparse_col_indices)
    assert torch.equal(back.sparse_row_offsets, csr.sparse_row_offsets)
    index_bytes = {f: layer.nbytes - 4 * (3 * 92 + csr.nnz + 48) for f, layer in (("csr", csr), ("bitmask", bitmask))}
    assert index_bytes["bitmask"] == 48 * 6
    assert index_bytes["csr"] == 2 * csr.nnz + csr.sparse_row_offsets.element_size() * 49
    # int16 columns: the bitmask wins above about one entry in 16 (row pointers aside).
    if density in (0.0, 0.05):
        assert index_bytes["csr"] < index_bytes["bitmask"] * (1.2 if density else 1)
    else:
        assert index_bytes["bitmask"] < index_bytes["csr"] / 4


def test_bitmask_with_a_wrong_bit_count_is_reported():
    u, v, s, _ = random_factors(out_f=6, in_f=12, density=0.3)
    layer = LowRankSparseLinear.from_factors(u, v, s).with_sparse_format("bitmask")
    layer.sparse_bitmask[0, 1] |= 0x80  # a padding bit (column 15 of a 12-column matrix)
    assert "sets" in layer.csr_problem()


def test_csr_columns_must_ascend_within_a_row():
    u, v = torch.randn(2, 1), torch.randn(1, 4)
    with pytest.raises(ValueError, match="strictly ascend"):
        LowRankSparseLinear.from_csr(u, v, torch.tensor([0, 2, 3]), torch.tensor([3, 1, 0]), torch.ones(3))
    with pytest.raises(ValueError, match="strictly ascend"):  # a repeated position
        LowRankSparseLinear.from_csr(u, v, torch.tensor([0, 2, 2]), torch.tensor([1, 1]), torch.ones(2))
    # A new row may start at a smaller column.
    LowRankSparseLinear.from_csr(u, v, torch.tensor([0, 1, 2]), torch.tensor([3, 0]), torch.ones(2))
