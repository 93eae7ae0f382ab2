"""The C kernels for the bitmask layout against the dense products they replace, and their fallback."""

import copy
import os
import subprocess
import sys
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_lrs import LowRankSparseLinear, QuantizedLowRankSparseLinear
from optimum_lrs.nn import kernel_library, kernels
from optimum_lrs.nn.storage import BITMASK_KERNEL_MAX_DENSITY, DENSE_REBUILD_TOKENS, pack_bits

from .conftest import env_flag

needs_kernels = pytest.mark.skipif(kernel_library.compiler() is None, reason="no C compiler on this machine")

# Token counts around every path switch: the per-byte path (<= 8), whole and partial 96-token tiles (and the
# S^T product's 48-token tiles).
TOKENS = [1, 2, 5, 8, 9, 17, 48, 49, 96, 97, 100, 200]


FACTOR_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def sparse(rows: int, cols: int, density: float, seed: int = 0,
           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random S (dense float32, of values representable in `dtype`), its packed mask and its row-major
    values in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < density
    dense = (torch.randn(rows, cols, generator=g) * mask).to(dtype).float()
    return dense, pack_bits(mask), dense[mask].to(dtype)


def stored(dtype: torch.dtype, *shape: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random factor in `dtype` and the same values in float32."""
    factor = torch.randn(*shape, generator=generator).to(dtype)
    return factor, factor.float()


@pytest.mark.skipif(kernel_library.compiler() is None and not env_flag("CI"),
                    reason="no C compiler on this machine (under CI=true that fails here instead)")
def test_the_kernels_build_where_a_compiler_exists():
    """Where a compiler exists, and always under CI=true, the fast path must really run, not silently fall back:
    a CI machine without a compiler fails here instead of skipping every kernel test with CI green."""
    assert kernel_library.compiler() is not None, "no C compiler found: install gcc or clang (or set CC)"
    assert kernels.bitmask_library() is not None


@needs_kernels
@pytest.mark.parametrize("dtype", FACTOR_DTYPES)
@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (7, 13), (33, 70), (40, 64), (96, 200)])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.4, 1.0])
def test_products_match_the_dense_ones(rows, cols, density, dtype):
    """Factors stored in float32, bfloat16 or float16 are read as stored and summed in float32: every product
    equals the float32 product with the same factor values, to float32 rounding."""
    s, mask, values = sparse(rows, cols, density, seed=rows * cols, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    for tokens in TOKENS:
        x, start = torch.randn(tokens, cols, generator=g), torch.randn(tokens, rows, generator=g)
        got = kernels.bitmask_addmm_(start.clone(), x, mask, values)
        torch.testing.assert_close(got, start + x @ s.t(), rtol=1e-5, atol=1e-4)
        grad, start_t = torch.randn(tokens, rows, generator=g), torch.randn(tokens, cols, generator=g)
        got_t = kernels.bitmask_addmm_t_(start_t.clone(), grad, mask, values)
        torch.testing.assert_close(got_t, start_t + grad @ s, rtol=1e-5, atol=1e-4)
        for rank, bias in ((0, None), (3, torch.randn(rows, generator=g)), (6, None)):
            (u, u32), (v, v32) = stored(dtype, rows, rank, generator=g), stored(dtype, rank, cols, generator=g)
            expected = x @ (u32 @ v32 + s).t() + (0 if bias is None else bias)
            got = kernels.lowrank_bitmask_matmul(x, u, v, bias, mask, values)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
            if tokens <= kernels.few_tokens():
                got = kernels.lowrank_bitmask_few(x, u, v, bias, mask, values)
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(kernels.bitmask_to_dense(mask, values, cols), s)


@needs_kernels
def test_a_real_sized_layer_matches_at_every_path():
    """576 x 576 at the 50% split's density: several row blocks and mask words per row."""
    s, mask, values = sparse(576, 576, 0.4)
    u, v = torch.randn(576, 28), torch.randn(28, 576)
    for tokens in (1, 8, 64, 300, 512):
        x = torch.randn(tokens, 576, generator=torch.Generator().manual_seed(tokens))
        got = kernels.bitmask_addmm_(torch.zeros(tokens, 576), x, mask, values)
        torch.testing.assert_close(got, x @ s.t(), rtol=1e-4, atol=1e-3)
        got = kernels.lowrank_bitmask_matmul(x, u, v, None, mask, values)
        torch.testing.assert_close(got, x @ (u @ v + s).t(), rtol=1e-4, atol=1e-2)


@needs_kernels
def test_a_mask_that_disagrees_with_the_values_is_refused_and_writes_nothing():
    _, mask, values = sparse(9, 20, 0.5)
    out = torch.ones(3, 9)
    for call in (lambda: kernels.bitmask_addmm_(out, torch.randn(3, 20), mask, values[:-1]),
                 lambda: kernels.bitmask_addmm_t_(torch.ones(3, 20), torch.randn(3, 9), mask, values[1:]),
                 lambda: kernels.bitmask_to_dense(mask, values[:-2], 20),
                 lambda: kernels.lowrank_bitmask_matmul(torch.randn(3, 20), torch.randn(9, 2), torch.randn(2, 20), None,
                                                        mask, values[:-1])):
        with pytest.raises(ValueError, match="set bits"):
            call()
    assert torch.equal(out, torch.ones(3, 9))
    with pytest.raises(ValueError, match="disagree"):
        kernels.bitmask_addmm_(out, torch.randn(3, 25), mask, values)
    with pytest.raises(ValueError, match="disagree"):
        kernels.lowrank_bitmask_matmul(torch.randn(3, 20), torch.randn(9, 2), torch.randn(3, 20), None, mask, values)
    with pytest.raises(ValueError, match="disagree"):
        kernels.lowrank_bitmask_matmul(torch.randn(3, 20), torch.randn(9, 2), torch.randn(2, 20), torch.ones(8), mask,
                                       values)
    with pytest.raises(ValueError, match="uint8"):
        kernels.bitmask_to_dense(mask.to(torch.int16), values, 20)
    with pytest.raises(ValueError, match="CPU"):
        kernels.bitmask_addmm_(out, torch.randn(3, 20, device="meta"), mask, values)
    with pytest.raises(ValueError, match="rows"):
        kernels.lowrank_bitmask_few(torch.randn(kernels.few_tokens() + 1, 20), torch.randn(9, 2), torch.randn(2, 20),
                                    None, mask, values)


def _layer(in_f=70, out_f=45, rank=4, density=0.4, bias=True, dtype=torch.float32) -> LowRankSparseLinear:
    g = torch.Generator().manual_seed(7)
    s = torch.randn(out_f, in_f, generator=g) * (torch.rand(out_f, in_f, generator=g) < density)
    b = torch.randn(out_f, generator=g) if bias else None
    return LowRankSparseLinear.from_factors(torch.randn(out_f, rank, generator=g), torch.randn(rank, in_f, generator=g),
                                            s, b, dtype=dtype).with_sparse_format("bitmask")


@needs_kernels
@pytest.mark.parametrize("dtype", FACTOR_DTYPES)
@pytest.mark.parametrize("tokens", [1, 6, 50, DENSE_REBUILD_TOKENS])
@pytest.mark.parametrize("rank", [0, 4])
@pytest.mark.parametrize("density", [0.4, 0.8])
def test_layer_forward_with_and_without_the_kernels_agree(dtype, tokens, rank, density):
    layer = _layer(dtype=dtype, rank=rank, density=density)
    x = torch.randn(2, tokens, 70, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    with torch.no_grad():
        fast = layer(x)
        with kernels.disabled():
            assert not kernels.can_run(x)
            slow = layer(x)
    expected = x.float() @ layer.dense_weight().float().t() + layer.bias.float()
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]  # the output's rounding
    assert fast.dtype == dtype and fast.shape == (2, tokens, 45)
    torch.testing.assert_close(fast.float(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    torch.testing.assert_close(fast.float(), slow.float(), rtol=tol, atol=tol * expected.abs().max().item())


def _quantized(dtype: torch.dtype) -> QuantizedLowRankSparseLinear:
    return QuantizedLowRankSparseLinear.quantize(_layer(in_f=96, out_f=64), 4, 32).to(dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quantized", [False, True])
def test_decoding_in_the_factors_dtype_gives_the_general_paths_bits(monkeypatch, dtype, quantized):
    """A decoding step in the factors' dtype goes straight to the layer's prepared call, which widens x and bias
    and rounds the output in C: the same bits as the general path (torch casts around a float32 call)."""
    layer = _quantized(dtype) if quantized else _layer(in_f=96, out_f=64, dtype=dtype)
    calls = []
    original = kernels.FewCall.__call__
    monkeypatch.setattr(kernels.FewCall, "__call__", lambda self, x: calls.append(x.dtype) or original(self, x))
    for shape in [(96,), (1, 96), (2, 3, 96)]:
        x = torch.randn(*shape).to(dtype)
        with torch.no_grad():
            fast, general = layer(x), layer(x.float())
        assert fast.dtype == dtype and fast.shape == (*shape[:-1], 64)
        assert torch.equal(fast.float(), general)
    assert calls == [dtype, torch.float32] * 3


@needs_kernels
@pytest.mark.parametrize("quantized", [False, True])
def test_the_prepared_call_follows_the_layers_tensors(quantized):
    """The prepared call holds pointers, kept while the layer's tensors stay where they are: after a cast, a state
    dict loaded in place, a tensor replaced and a deep copy, each step gives what a layer built afresh gives."""
    def make() -> LowRankSparseLinear:
        return QuantizedLowRankSparseLinear.quantize(_layer(96, 64), 4, 32) if quantized else _layer(96, 64)

    layer, other, x = make(), make(), torch.randn(2, 96)
    with torch.no_grad():  # other positions (as many), other low-rank values
        other.sparse_bitmask.copy_(other.sparse_bitmask.roll(1, 0))
        if quantized:
            other.lowrank_u_codes.copy_(255 - other.lowrank_u_codes)
        else:
            other.lowrank_u.neg_()
        assert_close = torch.testing.assert_close
        assert_close(layer(x), make()(x), rtol=0, atol=0)
        layer.to(torch.bfloat16)
        assert_close(layer(x.bfloat16()), make().to(torch.bfloat16)(x.bfloat16()), rtol=0, atol=0)
        layer.to(torch.float32).load_state_dict(other.state_dict())  # copied into the layer's tensors
        assert_close(layer(x), other(x), rtol=0, atol=0)
        name = "sparse_values_scales" if quantized else "sparse_values"
        setattr(layer, name, torch.nn.Parameter(getattr(layer, name) * 2, requires_grad=False))
        setattr(other, name, torch.nn.Parameter(getattr(other, name) * 2, requires_grad=False))
        assert_close(layer(x), other(x), rtol=0, atol=0)
        assert_close(copy.deepcopy(layer)(x), other(x), rtol=0, atol=0)


@needs_kernels
def test_bitmask_inputs_build_a_dense_weight_only_for_long_inputs_to_dense_layers(monkeypatch):
    sparse_layer, dense_layer = _layer(density=0.4), _layer(density=0.9)
    assert sparse_layer.nnz <= BITMASK_KERNEL_MAX_DENSITY * 70 * 45 < dense_layer.nnz
    rebuilt = []
    rebuild = LowRankSparseLinear._rebuilt_weight
    monkeypatch.setattr(LowRankSparseLinear, "_rebuilt_weight",
                        lambda self, dtype=None: rebuilt.append(self) or rebuild(self, dtype))
    monkeypatch.setattr(LowRankSparseLinear, "dense_weight", lambda self: pytest.fail("forward densified W"))
    with torch.no_grad():
        sparse_layer(torch.randn(DENSE_REBUILD_TOKENS * 3, 70))
        dense_layer(torch.randn(DENSE_REBUILD_TOKENS - 1, 70))
        assert rebuilt == []
        dense_layer(torch.randn(DENSE_REBUILD_TOKENS, 70))
        assert rebuilt == [dense_layer]
    dense_layer(torch.randn(DENSE_REBUILD_TOKENS + 5, 70, requires_grad=True))  # training stays sparse however long
    assert rebuilt == [dense_layer]


@needs_kernels
def test_concurrent_callers_each_get_their_own_work_buffer():
    """The tile buffer is kept per calling thread between calls: threads running layers at once (a server)
    must not share it, and a larger input grows it."""
    layers = [_layer(density=d) for d in (0.1, 0.3, 0.5)]
    inputs = [torch.randn(tokens, 70, generator=torch.Generator().manual_seed(tokens)) for tokens in (20, 300, 700)]
    expected = [[x @ lay.dense_weight().t() + lay.bias for x in inputs] for lay in layers]
    errors = []

    def work(seed: int) -> None:
        order = torch.randperm(9, generator=torch.Generator().manual_seed(seed)).tolist()
        with torch.no_grad():
            for _ in range(5):
                for k in order:
                    got = layers[k // 3](inputs[k % 3])
                    if not torch.allclose(got, expected[k // 3][k % 3], rtol=1e-4, atol=1e-3):
                        errors.append((seed, k))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


@needs_kernels
@pytest.mark.parametrize("tokens", [3, 130])
def test_input_gradient_through_the_kernels_matches_dense(tokens):
    layer = _layer()
    x = torch.randn(tokens, 70, generator=torch.Generator().manual_seed(3), requires_grad=True)
    grad_out = torch.randn(tokens, 45, generator=torch.Generator().manual_seed(4))
    (layer(x) * grad_out).sum().backward()
    torch.testing.assert_close(x.grad, grad_out @ layer.dense_weight(), rtol=1e-4, atol=1e-4)
    assert all(p.grad is None for p in layer.parameters())


@needs_kernels
def test_a_build_without_vector_instructions_reads_every_dtype(tmp_path):
    """Where the compiler cannot target this CPU (no -march=native: no AVX2, no F16C), the portable code reads
    bfloat16 and float16 (its own float16 widening: normal, subnormal, zero, inf) and gives the same products."""
    script = (
        "import torch\nfrom optimum_lrs.nn import kernel_library, kernels\nfrom optimum_lrs.nn.storage import pack_bits\n"
        "kernel_library.FLAG_SETS = (['-O3'],)\n"
        "assert kernels.bitmask_library() is not None and kernels.few_tokens() == 0\n"
        "halves = torch.tensor([1.0, -2.5, 6e-5, -3e-7, 0.0, -0.0, 65504.0, 1e-3], dtype=torch.float16)\n"
        "mask = torch.ones(1, 8, dtype=torch.bool)\n"
        "dense = kernels.bitmask_to_dense(pack_bits(mask), halves, 8)\n"
        "assert torch.equal(dense[0], halves.float()), dense\n"
        "inf = kernels.bitmask_to_dense(pack_bits(mask), torch.full((8,), float('-inf'), dtype=torch.float16), 8)\n"
        "assert bool((inf == float('-inf')).all())\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for dtype in (torch.float32, torch.bfloat16, torch.float16):\n"
        "    keep = torch.rand(20, 37, generator=g) < 0.4\n"
        "    s = (torch.randn(20, 37, generator=g) * keep).to(dtype)\n"
        "    u, v = torch.randn(20, 3, generator=g).to(dtype), torch.randn(3, 37, generator=g).to(dtype)\n"
        "    x = torch.randn(11, 37, generator=g)\n"
        "    got = kernels.lowrank_bitmask_matmul(x, u, v, None, pack_bits(keep), s[keep])\n"
        "    torch.testing.assert_close(got, x @ (u.float() @ v.float() + s.float()).t(), rtol=1e-5, atol=1e-4)\n"
        "print('portable ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "OPTIMUM_LRS_CACHE": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "portable ok" in proc.stdout


@needs_kernels
def test_factors_in_a_dtype_the_kernels_do_not_read_take_the_torch_path(caplog):
    """float64 layers compute in float64 by torch (the kernels would round them to float32), and say so once."""
    layer = _layer(dtype=torch.float64)
    x = torch.randn(2, 5, 70, dtype=torch.float64)
    with caplog.at_level("WARNING", logger="optimum_lrs"), torch.no_grad():
        kernels._note_other_dtype.cache_clear()
        first, second = layer(x), layer(x)
    expected = x @ layer.dense_weight().t() + layer.bias
    torch.testing.assert_close(first, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(first, second) and first.dtype == torch.float64
    assert [r.getMessage() for r in caplog.records].count(
        "optimum_lrs: the bitmask kernels read float32, bfloat16 and float16 factors; layers in torch.float64 use "
        "the slower torch path") == 1


def _fallback_run(env: dict[str, str]) -> subprocess.CompletedProcess:
    script = (
        "import logging, torch; logging.basicConfig(level=logging.WARNING)\n"
        "from optimum_lrs import LowRankSparseLinear\nfrom optimum_lrs.nn import kernels\n"
        "assert kernels.bitmask_library() is None\n"
        "g = torch.Generator().manual_seed(0)\n"
        "s = torch.randn(12, 20, generator=g) * (torch.rand(12, 20, generator=g) < 0.4)\n"
        "layer = LowRankSparseLinear.from_factors(torch.randn(12, 2), torch.randn(2, 20), s).with_sparse_format('bitmask')\n"
        "x = torch.randn(3, 20)\n"
        "assert torch.allclose(layer(x), x @ layer.dense_weight().t(), atol=1e-5)\n"
        "print('fallback ok')\n"
    )
    return subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)


def test_without_a_working_compiler_layers_fall_back_to_torch(tmp_path):
    proc = _fallback_run({"CC": "false", "OPTIMUM_LRS_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "fallback ok" in proc.stdout and "bitmask kernels unavailable" in proc.stderr


def test_the_kernels_can_be_switched_off(tmp_path):
    proc = _fallback_run({"OPTIMUM_LRS_NO_KERNELS": "1", "OPTIMUM_LRS_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "fallback ok" in proc.stdout and not list(tmp_path.iterdir())


@needs_kernels
@given(st.integers(1, 40), st.integers(1, 150), st.floats(0.0, 1.0), st.integers(1, 300), st.integers(0, 6),
       st.booleans(), st.integers(0, 2**16))
@settings(max_examples=150, deadline=None)
def test_random_layers_match_the_dense_product_on_every_path(rows, cols, density, tokens, rank, bias, seed):
    """Random shapes (columns not a multiple of 8 included), densities and token counts: the layer's kernel
    paths (fused, tiles, rebuild) and the input gradient all equal the dense formula."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density)
    layer = LowRankSparseLinear.from_factors(torch.randn(rows, rank, generator=g), torch.randn(rank, cols, generator=g),
                                             s, torch.randn(rows, generator=g) if bias else None)
    layer = layer.with_sparse_format("bitmask")
    x = torch.randn(tokens, cols, generator=g, requires_grad=True)
    weight = layer.dense_weight()
    expected = x.detach() @ weight.t() + (layer.bias if bias else 0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
    grad_out = torch.randn(tokens, rows, generator=g)
    (layer(x) * grad_out).sum().backward()
    torch.testing.assert_close(x.grad, grad_out @ weight, rtol=1e-4, atol=1e-4)
