"""Property-based fuzzing that runs both branches fully: inputs drawn valid must be accepted (configs survive
config.json, layers compute what their dense weight does), and the same inputs with one part broken must be
refused with a message naming that part. Random junk, the third property, must never crash otherwise."""

import json

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optimum_lrs import LowRankSparseConfig, LowRankSparseLinear
from optimum_lrs.config import FACTOR_DTYPES, OBJECTIVES, PIPELINES, RPCA_SOLVERS, SELECTIONS, SPARSE_VALUES
from optimum_lrs.nn.quantize import ROUNDINGS

FIELDS = list(LowRankSparseConfig._fields())
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FRACTIONS = st.floats(0.01, 0.99)


def _some(fields: dict) -> st.SearchStrategy:
    """A dict of any subset of `fields` (name -> strategy of valid values)."""
    return st.fixed_dictionaries({}, optional=fields)


@st.composite
def valid_configs(draw) -> dict:
    """config.json-like dicts every field of which holds an allowed value, the fields' couplings respected."""
    data = draw(_some({
        "param_ratio": FRACTIONS,
        "allocation": st.sampled_from(["uniform", "cap", "global_greedy"]),
        "target_modules": st.none() | st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True)
        | st.just(r".*\.(q|k)_proj"),
        "modules_to_not_convert": st.none() | st.lists(st.sampled_from(NAMES), min_size=1, max_size=2, unique=True),
        "activation_aware": st.booleans(),
        "sparse_format": st.sampled_from(["bitmask", "csr"]),
        "factor_dtype": st.sampled_from(FACTOR_DTYPES),
        "seed": st.integers(0, 2**31),
        "rpca": _some({"l1_weight": st.none() | st.floats(1e-4, 10), "max_iter": st.integers(1, 200),
                       "tol": st.none() | st.floats(1e-6, 0.5), "rho": st.floats(1.01, 4),
                       "solver": st.sampled_from(RPCA_SOLVERS),
                       "max_rank": st.sampled_from(["auto", None]) | st.integers(1, 512)}),
        "refit": _some({"selection": st.sampled_from(SELECTIONS), "values": st.sampled_from(SPARSE_VALUES),
                        "iterations": st.integers(0, 40), "objective": st.sampled_from(OBJECTIVES),
                        "block_matching_steps": st.just("auto") | st.integers(0, 64)}),
        "calibration": _some({"seq_len": st.integers(2, 4096), "num_samples": st.integers(1, 512),
                              "pipeline": st.sampled_from(PIPELINES)}),
        "quantization": st.none() | st.sampled_from([4, 8]) | _some({
            "bits": st.sampled_from([4, 8]), "group_size": st.integers(1, 128).map(lambda g: 2 * g),
            "rounding": st.sampled_from(ROUNDINGS), "error_feedback": st.booleans(), "refit_scales": st.booleans(),
            "match_scales": st.booleans()}),
        "byte_ratio": FRACTIONS,
    }))
    refit = data.get("refit", {})
    if refit.get("selection") == "allocation":  # its own RPCA candidates: no refits, the rms objective
        refit.update(iterations=0, objective="rms")
    if refit.get("objective") == "second_moment":
        data["activation_aware"] = True
    if "byte_ratio" in data:  # one budget, and bytes need the bitmask layout
        data.pop("param_ratio", None)
        data["sparse_format"] = "bitmask"
    return data


@given(valid_configs())
@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
def test_a_valid_config_is_accepted_and_survives_config_json(data):
    cfg = LowRankSparseConfig.from_dict(data)
    assert LowRankSparseConfig.from_dict(json.loads(cfg.to_json_string())) == cfg


# (dotted field, a value it must refuse): each is set into an otherwise valid config.
BROKEN = [
    ("param_ratio", 0), ("param_ratio", 1.5), ("param_ratio", "half"), ("param_ratio", float("nan")),
    ("byte_ratio", -0.2), ("seed", -1), ("seed", 1.5), ("activation_aware", 1), ("sparse_format", "coo"),
    ("factor_dtype", "int8"), ("allocation", "random"), ("target_modules", []), ("target_modules", [""]),
    ("modules_to_not_convert", "q_proj"), ("rpca.max_iter", 0), ("rpca.tol", 2.0), ("rpca.rho", 1.0),
    ("rpca.solver", "qr"), ("rpca.max_rank", 0), ("refit.selection", "column"), ("refit.values", "dense"),
    ("refit.iterations", -1), ("refit.objective", "l1"), ("refit.block_matching_steps", "many"),
    ("calibration.seq_len", 1), ("calibration.num_samples", 0), ("calibration.pipeline", "parallel"),
    ("quantization.bits", 3), ("quantization.group_size", 7), ("quantization.rounding", "stochastic"),
    ("quantization.refit_scales", "yes"), ("quantization.match_scales", 0), ("no_such_field", 1),
    ("rpca.no_such_field", 1),
]


@given(valid_configs(), st.sampled_from(BROKEN))
@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
def test_one_broken_field_is_refused_with_its_name(data, broken):
    path, value = broken
    *parents, leaf = path.split(".")
    target = data
    for parent in parents:
        if not isinstance(target.get(parent), dict):
            target[parent] = {}
        target = target[parent]
    target[leaf] = value
    if path == "byte_ratio":
        data.pop("param_ratio", None)
    try:
        LowRankSparseConfig.from_dict(data)
    except (ValueError, TypeError) as exc:
        assert leaf in str(exc), (path, str(exc))
    else:
        raise AssertionError(f"{path}={value!r} was accepted in {data}")


@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), JSON_VALUES, max_size=8))
@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
def test_random_dicts_are_accepted_or_refused_with_a_message(data):
    try:
        cfg = LowRankSparseConfig.from_dict(data)
    except (ValueError, TypeError) as exc:
        assert str(exc)
        return
    assert LowRankSparseConfig.from_dict(json.loads(cfg.to_json_string())) == cfg


@st.composite
def csr_layers(draw) -> tuple:
    """U, V and well-formed CSR arrays of S (column indices strictly ascending in each row), with a seed."""
    out_f, in_f, rank = draw(st.integers(1, 9)), draw(st.integers(1, 40)), draw(st.integers(0, 4))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    density = draw(st.floats(0.0, 1.0))
    mask = torch.rand(out_f, in_f, generator=g) < density
    rows = torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)])
    cols = mask.nonzero()[:, 1]
    return (torch.randn(out_f, rank, generator=g), torch.randn(rank, in_f, generator=g), rows, cols,
            torch.randn(cols.numel(), generator=g), seed)


@given(csr_layers(), st.sampled_from([torch.float32, torch.bfloat16]), st.sampled_from(["csr", "bitmask"]))
@settings(max_examples=150, deadline=4000)
def test_a_layer_from_valid_csr_arrays_computes_its_dense_weight(arrays, dtype, sparse_format):
    u, v, rows, cols, values, seed = arrays
    layer = LowRankSparseLinear.from_csr(u, v, rows, cols, values, dtype=dtype, sparse_format=sparse_format)
    dense = u @ v
    dense[torch.repeat_interleave(torch.arange(len(rows) - 1), rows.diff()), cols] += values
    assert torch.allclose(layer.dense_weight().float(), dense.to(dtype).float(), atol=0.05 if dtype == torch.bfloat16 else 1e-5,
                          rtol=0.02 if dtype == torch.bfloat16 else 1e-5)
    x = torch.randn(3, v.shape[1], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = layer(x.to(dtype)).float()
    expected = x.to(dtype).float() @ layer.dense_weight().float().t()
    assert torch.allclose(y, expected, atol=0.1 if dtype == torch.bfloat16 else 1e-4,
                          rtol=0.05 if dtype == torch.bfloat16 else 1e-4)


@given(csr_layers(), st.sampled_from(["first offset", "last offset", "descending offsets", "column past the end",
                                      "negative column", "repeated column"]))
@settings(max_examples=150, deadline=4000)
def test_valid_csr_arrays_with_one_fault_are_refused(arrays, fault):
    u, v, rows, cols, values, _ = arrays
    rows, cols = rows.clone(), cols.clone()
    counts = rows.diff()
    if fault == "first offset":
        rows[0] = 1
    elif fault == "last offset":
        rows[-1] += 1
    elif fault == "descending offsets":
        if len(rows) < 3 or cols.numel() == 0:
            rows[0] = -1
        else:
            rows[1] = rows[2] + 1
    elif fault in ("column past the end", "negative column"):
        if cols.numel() == 0:
            rows[-1] = 1  # no column to break: the offsets claim one
        else:
            cols[-1] = v.shape[1] if fault == "column past the end" else -1
    else:  # a row holding a column twice: needs a row of two entries
        row = int(torch.nonzero(counts >= 2)[0]) if (counts >= 2).any() else None
        if row is None:
            rows[0] = 1
        else:
            cols[int(rows[row]) + 1] = cols[int(rows[row])]
    try:
        LowRankSparseLinear.from_csr(u, v, rows, cols, values)
    except ValueError as exc:
        assert "CSR" in str(exc) or "incompatible" in str(exc), str(exc)
    else:
        raise AssertionError(f"{fault}: accepted rows {rows.tolist()} cols {cols.tolist()}")
