"""Property-based fuzzing: random config dicts and random layer tensors get ValueError/TypeError or work."""

import json

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optimum_lrs import LowRankSparseConfig, LowRankSparseLinear

FIELDS = list(LowRankSparseConfig._fields())
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), JSON_VALUES, max_size=8))
@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
def test_from_dict_accepts_or_rejects_with_a_message(data):
    try:
        cfg = LowRankSparseConfig.from_dict(data)
    except (ValueError, TypeError) as exc:
        assert str(exc)
        return
    # Whatever was accepted survives the round trip through config.json exactly.
    assert LowRankSparseConfig.from_dict(json.loads(cfg.to_json_string())) == cfg


shapes = st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(0, 3))


@given(shapes, st.integers(0, 2**16), st.integers(-3, 40), st.sampled_from([torch.float32, torch.bfloat16]))
@settings(max_examples=200, deadline=2000)
def test_layer_from_random_csr_arrays_builds_a_valid_layer_or_refuses(shape, seed, nnz, dtype):
    out_f, in_f, rank = shape
    g = torch.Generator().manual_seed(seed)
    nnz = max(nnz, 0)
    rows = torch.randint(-1, nnz + 2, (out_f + 1,), generator=g).sort().values
    if seed % 3 == 0:  # a third of the cases get well-formed offsets
        rows = torch.linspace(0, nnz, out_f + 1).round().long()
    cols = torch.randint(-2, in_f + 2, (nnz,), generator=g)
    try:
        layer = LowRankSparseLinear.from_csr(torch.randn(out_f, rank, generator=g), torch.randn(rank, in_f, generator=g),
                                             rows, cols, torch.randn(nnz, generator=g), dtype=dtype)
    except (ValueError, TypeError) as exc:
        assert str(exc)
        return
    assert layer.csr_problem() is None
    x = torch.randn(2, in_f, generator=g)
    y = layer(x.to(dtype))
    assert y.shape == (2, out_f) and torch.isfinite(y.float()).all()
    expected = x @ layer.dense_weight().float().t()
    assert torch.allclose(y.float(), expected, atol=0.1 if dtype == torch.bfloat16 else 1e-4, rtol=0.05)
