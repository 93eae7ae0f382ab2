"""The C kernels that read a quantized layer's codes (`kernels.quantized_bitmask_few`, `kernels.dequantize_codes`)
against the dequantized layer they stand for."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_lrs import LowRankSparseLinear, QuantizedLowRankSparseLinear
from optimum_lrs.nn import kernel_library, kernels, storage
from optimum_lrs.nn.quantize import dequantize_groups, unpack_codes
from optimum_lrs.nn.quantized_linear import QUANTIZED_KERNEL_ROWS

needs_kernels = pytest.mark.skipif(kernel_library.compiler() is None, reason="no C compiler on this machine")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def quantized(rows: int, cols: int, rank: int, density: float, bits: int, group: int, bias: bool, seed: int,
              dtype: torch.dtype) -> QuantizedLowRankSparseLinear:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density)
    layer = LowRankSparseLinear.from_factors(torch.randn(rows, rank, generator=g), torch.randn(rank, cols, generator=g),
                                             s, torch.randn(rows, generator=g) if bias else None)
    return QuantizedLowRankSparseLinear.quantize(layer.with_sparse_format("bitmask"), bits, group).to(dtype)


def reference(layer: QuantizedLowRankSparseLinear, x: torch.Tensor) -> torch.Tensor:
    """x W^T + b in float64 with W the dequantized factors' U V + S (each value rounded to the factor dtype)."""
    with kernels.disabled():
        floats = layer.dequantized()
        weight = floats.lowrank_u.double() @ floats.lowrank_v.double() + floats.sparse_matrix().to_dense().double()
    out = x.double() @ weight.t()
    return (out if layer.bias is None else out + layer.bias.double()).float()


def assert_near(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    error = float((got.float() - want).norm() / want.norm().clamp_min(1e-30))
    assert error < rel, error


@needs_kernels
@given(st.sampled_from([8, 16, 32, 64]), st.integers(1, 6), st.integers(1, 6), st.integers(0, 5), st.floats(0.0, 1.0),
       st.sampled_from([4, 8]), st.booleans(), st.integers(1, 20), st.sampled_from(DTYPES), st.integers(0, 2**16))
@settings(max_examples=120, deadline=None)
def test_random_quantized_layers_decode_as_their_dequantized_weight(group, row_groups, col_groups, rank, density, bits,
                                                                    bias, tokens, dtype, seed):
    """Any group size, rank (0 included), density (empty and full), width, token count (1..20: groups of 8 and
    what is left) and factor dtype:
    the kernel's product equals the dequantized layer's to float32 summation (the bfloat16 path sums products of
    bfloat16 inputs, which the layer's input in bfloat16 holds exactly)."""
    layer = quantized(group * row_groups, group * col_groups, rank, density, bits, group, bias, seed, dtype)
    x = torch.randn(tokens, layer.in_features, generator=torch.Generator().manual_seed(seed)).to(dtype)
    with torch.no_grad():
        got = layer(x)
    assert got.dtype == dtype and got.shape == (tokens, layer.out_features)
    assert_near(got, reference(layer, x), 2e-2 if dtype != torch.float32 else 1e-5)
    # the float32 sums themselves, before the output is rounded to the layer's dtype
    args = [(getattr(layer, f"{n}_codes"), getattr(layer, f"{n}_scales")) for n in ("lowrank_u", "lowrank_v")]
    raw = kernels.quantized_bitmask_few(x.float(), *args, layer.bias, layer.sparse_bitmask,
                                        (layer.sparse_values_codes, layer.sparse_values_scales), layer.nnz, bits, group)
    assert_near(raw, reference(layer, x), 1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_a_real_sized_layer_decodes_on_every_token_count(dtype, bits):
    """SmolLM2's MLP shape, groups of 64: runs of 32 codes within groups, ends of rows that go code by code, several
    rows dequantized at a time, the columns taken in blocks (from 2 tokens on) and tokens in groups of 8 all meet
    in one product."""
    layer = quantized(192, 1536, 20, 0.6, bits, 64, True, 0, dtype)
    for tokens in [*range(1, kernels.few_tokens() + 1), 19, 40]:
        x = torch.randn(tokens, 1536, generator=torch.Generator().manual_seed(tokens)).to(dtype)
        args = [(getattr(layer, f"{n}_codes"), getattr(layer, f"{n}_scales")) for n in ("lowrank_u", "lowrank_v")]
        got = kernels.quantized_bitmask_few(x.float(), *args, layer.bias, layer.sparse_bitmask,
                                            (layer.sparse_values_codes, layer.sparse_values_scales), layer.nnz, bits, 64)
        assert_near(got, reference(layer, x), 1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_dequantized_codes_equal_the_torch_reference_exactly(dtype, bits):
    """The kernel's dequantization rounds code * scale to the factor dtype as torch does: the same values, bit for
    bit, at any offset in the stream (groups of 32 and 64, a stream length that ends mid-group)."""
    for group in (32, 64):
        layer = quantized(group * 3, group * 5, 7, 0.37, bits, group, False, group, dtype)
        for name in ("lowrank_u", "lowrank_v", "sparse_values"):
            codes, scales = getattr(layer, f"{name}_codes"), getattr(layer, f"{name}_scales")
            want = dequantize_groups(unpack_codes(codes, bits), scales, dtype).reshape(-1)
            got = kernels.dequantize_codes(codes, scales, bits, group).to(dtype)
            assert torch.equal(got, want), name


@needs_kernels
def test_short_inputs_read_the_codes_and_long_ones_rebuild_s_from_them(monkeypatch):
    """Up to `QUANTIZED_KERNEL_ROWS` rows a quantized layer runs the codes kernel; more rows rebuild S densely from
    its codes; neither ever builds the float factors' layer, which a gradient does. Without this, decoding a
    quantized model would dequantize every layer per token."""
    layer = quantized(64, 128, 4, 0.5, 4, 32, True, 0, torch.bfloat16)
    shapes = [(1, 3, 128), (3, 7, 128), (QUANTIZED_KERNEL_ROWS, 128), (QUANTIZED_KERNEL_ROWS + 1, 128), (300, 128)]
    inputs = [torch.randn(*shape).to(torch.bfloat16) for shape in shapes]
    wanted = [reference(layer, x) for x in inputs]
    calls = []
    few, dense = kernels.FewCall.__call__, kernels.quantized_to_dense
    monkeypatch.setattr(kernels.FewCall, "__call__", lambda self, x: calls.append(self.name) or few(self, x))
    monkeypatch.setattr(kernels, "quantized_to_dense", lambda *a, **k: calls.append("quantized_to_dense") or dense(*a, **k))
    original = QuantizedLowRankSparseLinear.dequantized
    monkeypatch.setattr(QuantizedLowRankSparseLinear, "dequantized", lambda self: calls.append("float") or original(self))
    for x, want in zip(inputs, wanted):
        with torch.no_grad():
            assert_near(layer(x), want, 2e-2)
    assert calls == ["quantized_few"] * 3 + ["quantized_to_dense"] * 2
    layer(torch.randn(2, 128, requires_grad=True).to(torch.bfloat16))
    assert calls[-1] == "float"


@needs_kernels
@pytest.mark.parametrize("slow", [True, False])
def test_long_half_precision_inputs_multiply_in_float32_where_half_matmul_is_slow(monkeypatch, slow):
    """On an x86 CPU below AVX-512 torch's bfloat16 matmul runs several times slower than float32's, so a long input
    to a bfloat16 layer multiplies its rebuilt weight in float32 there (S rebuilt in float32, no bfloat16 copy),
    and in bfloat16 elsewhere; the output is bfloat16 and the layer's product either way."""
    monkeypatch.setattr(storage, "_half_matmul_is_slow", lambda: slow)
    layer = quantized(64, 128, 4, 0.5, 4, 32, True, 1, torch.bfloat16)
    x = torch.randn(QUANTIZED_KERNEL_ROWS + 1, 128).to(torch.bfloat16)
    assert storage.product_dtype(x) == (torch.float32 if slow else torch.bfloat16)
    rebuilt = []
    original = kernels.quantized_to_dense
    monkeypatch.setattr(kernels, "quantized_to_dense",
                        lambda *a, **k: rebuilt.append(a[-1]) or original(*a, **k))
    with torch.no_grad():
        got = layer(x)
    assert got.dtype == torch.bfloat16 and rebuilt == [torch.float32 if slow else torch.bfloat16]
    assert_near(got, reference(layer, x), 1e-2)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_s_rebuilt_from_codes_equals_the_dequantized_one(dtype):
    """The dense S written from the codes (bfloat16 directly where the build has the pairs path) is the torch
    reference's dense S, value for value."""
    layer = quantized(96, 200 // 8 * 8, 3, 0.55, 4, 8, False, 3, dtype)
    with kernels.disabled():
        want = layer.dequantized().sparse_matrix().to_dense()
    got = kernels.quantized_to_dense(layer.sparse_bitmask, (layer.sparse_values_codes, layer.sparse_values_scales),
                                     layer.nnz, 4, 8, layer.in_features, dtype)
    assert got.dtype == dtype and torch.equal(got, want)


@needs_kernels
def test_a_build_without_avx512_decodes_the_same(tmp_path):
    """Where the CPU has AVX2 but no AVX-512 (no bfloat16 pairs), 4-bit bfloat16 codes are looked up into bfloat16
    words (quantized_avx2.h) and the other dtypes and widths go through the float32 loops: the same products."""
    script = (
        "import torch, sys\nsys.path.insert(0, %r)\n"
        "from optimum_lrs.nn import kernel_library, kernels\n"
        "kernel_library.FLAG_SETS = (['-O3', '-mavx2', '-mfma', '-mf16c', '-fopenmp'], ['-O3', '-mavx2', '-mfma', '-mf16c'])\n"
        "assert kernels.bitmask_library() is not None and kernels.few_tokens() == 8\n"
        "from test_quantized_kernels import quantized, reference, assert_near\n"
        "for dtype in (torch.float32, torch.bfloat16, torch.float16):\n"
        "    for bits in (4, 8):\n"
        "        layer = quantized(96, 160, 5, 0.45, bits, 32, True, bits, dtype)\n"
        "        for tokens in (1, 3, 8, 13):\n"
        "            x = torch.randn(tokens, 160).to(dtype)\n"
        "            args = [(getattr(layer, n + '_codes'), getattr(layer, n + '_scales')) for n in ('lowrank_u', 'lowrank_v')]\n"
        "            got = kernels.quantized_bitmask_few(x.float(), *args, layer.bias, layer.sparse_bitmask,\n"
        "                (layer.sparse_values_codes, layer.sparse_values_scales), layer.nnz, bits, 32)\n"
        "            assert_near(got, reference(layer, x), 1e-5)\n"
        "print('avx2 ok')\n"
    ) % os.path.dirname(__file__)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "OPTIMUM_LRS_CACHE": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "avx2 ok" in proc.stdout
