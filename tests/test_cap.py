"""CAP (loss-driven global allocation) on tiny models, and its exact budget projection."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_lrs import LowRankSparseConfig, LowRankSparseLinear, compress_
from optimum_lrs.allocation.cap import project_to_budget

from .conftest import tiny_llama

CALIB = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(5))


def cap_config(**kw):
    base = dict(param_ratio=0.5, allocation="cap", calibration_data=CALIB, cap_steps=6, cap_samples=4, cap_batch_size=2)
    return LowRankSparseConfig(**{**base, **kw})


def compressed_params(model):
    return {n: m.num_parameters for n, m in model.named_modules() if isinstance(m, LowRankSparseLinear)}


def test_cap_meets_budget_and_is_deterministic():
    a, b = compress_(tiny_llama(), cap_config()), compress_(tiny_llama(), cap_config())
    kept = compressed_params(a)
    dense = sum(m.weight.numel() for n, m in tiny_llama().named_modules() if n in kept)
    assert abs(sum(kept.values()) - 0.5 * dense) <= 1e-3 * 0.5 * dense
    assert kept == compressed_params(b)
    ids = CALIB[:2]
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert a.config.quantization_config.compressed_modules == b.config.quantization_config.compressed_modules


@pytest.mark.xfail(
    strict=True,
    reason="known failure (docs/results.md): with one loss per jointly sampled mask, the REINFORCE estimate "
    "is dominated by the other layers' mask noise, and the share drifts the same way without the scaling",
)
@pytest.mark.parametrize("sparse_values", ["residual", "rpca"])
def test_cap_moves_budget_to_a_layer_the_loss_depends_on(sparse_values):
    """Scaling one layer's weight up makes the loss far more sensitive to its errors; only the loss shows it
    (the initial scores are relative to each layer's own energy, so the policy gradient has to find it)."""
    name = "model.layers.1.mlp.down_proj"

    def important_model():
        model = tiny_llama()
        with torch.no_grad():
            model.get_submodule(name).weight.mul_(30.0)
        return model

    dense = important_model().get_submodule(name).weight.numel()
    kw = dict(sparse_values=sparse_values, cap_steps=40, cap_samples=6, cap_lr=0.5)
    without_loss = compressed_params(compress_(important_model(), cap_config(**{**kw, "cap_steps": 0})))[name] / dense
    with_loss = compressed_params(compress_(important_model(), cap_config(**kw)))[name] / dense
    assert with_loss > without_loss + 0.05
    assert with_loss > 0.5  # uniform gives every matrix exactly its 50% share


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=5),
    costs=st.lists(st.integers(1, 50), min_size=5, max_size=5),
    fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_projection_onto_budget_is_exact(sizes, costs, fraction, seed):
    g = torch.Generator().manual_seed(seed)
    z = [torch.randn(n, generator=g) * 2 for n in sizes]
    c = [float(x) for x in costs[: len(sizes)]]
    total = sum(ci * t.numel() for t, ci in zip(z, c))
    if total == 0:
        return
    budget = fraction * total
    original = [t.clone() for t in z]
    nu = project_to_budget(z, c, budget)
    spent = sum(ci * t.sum().item() for t, ci in zip(z, c))
    assert spent == pytest.approx(budget, abs=1e-4 * total + 1e-6)
    for t, o, ci in zip(z, original, c):
        assert torch.all((t >= 0) & (t <= 1))
        assert torch.allclose(t, (o - nu * ci).clamp(0, 1), atol=1e-6)


def test_projection_rejects_impossible_budget():
    with pytest.raises(ValueError, match="outside"):
        project_to_budget([torch.zeros(3)], [2.0], 7.0)


def test_uniform_init_starts_every_layer_at_its_share():
    model = compress_(tiny_llama(), cap_config(cap_init="uniform", cap_steps=0))
    dense = {n: m.weight.numel() for n, m in tiny_llama().named_modules() if isinstance(m, torch.nn.Linear)}
    for name, kept in compressed_params(model).items():
        assert abs(kept / dense[name] - 0.5) < 0.1, (name, kept / dense[name])


def _counts(model):
    return {n: (e["rank"], e["nnz"]) for n, e in model.config.quantization_config.compressed_modules.items()}


def test_uniform_init_with_no_steps_is_the_uniform_allocation():
    """With the default extraction (expected counts), CAP's starting point is exactly the uniform allocation,
    rank/sparse split included: whatever CAP changes is the policy gradient's doing."""
    uniform = compress_(tiny_llama(), LowRankSparseConfig(param_ratio=0.5, calibration_data=CALIB))
    cap = compress_(tiny_llama(), cap_config(cap_steps=0))
    assert _counts(cap) == _counts(uniform)
    with torch.no_grad():
        assert torch.allclose(cap(CALIB[:2]).logits, uniform(CALIB[:2]).logits, atol=1e-5)


def test_global_ranking_extraction_still_meets_the_budget():
    model = compress_(tiny_llama(), cap_config(cap_rank_by="probability", cap_steps=2))
    kept = compressed_params(model)
    dense = sum(m.weight.numel() for n, m in tiny_llama().named_modules() if n in kept)
    assert abs(sum(kept.values()) - 0.5 * dense) <= 1e-3 * 0.5 * dense
