"""The second-moment layer fit (`objective="second_moment"`): its steps, its statistics, and that it lowers the
output error it targets."""

from __future__ import annotations

import copy

import pytest
import torch

from optimum_lrs import CalibrationConfig, compress_, LowRankSparseConfig, LowRankSparseLinear, RefitConfig
from optimum_lrs.stage1 import second_moment as sm
from optimum_lrs.stage1.activations import InputStatistics, dense_statistics
from optimum_lrs.targets import find_target_modules
from optimum_lrs.stage1.rpca import alternating_refit, best_low_rank

from .conftest import BUILDERS, tiny_llama

WINDOWS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(3))


def correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a few loud, correlated features, as in transformer activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) * (torch.rand(features, generator=g) ** 4 * 10 + 0.1)
    return torch.randn(tokens, features, generator=g) @ mix


def test_with_identity_moment_pruning_keeps_the_largest_entries_of_each_column_block_unchanged():
    w = torch.randn(12, 300, generator=torch.Generator().manual_seed(1))
    quotas = [100, 37, 5]  # columns 0-127, 128-255, 256-299
    kept, values = sm.prune_with_updates(w, torch.eye(300), quotas)
    assert int((values != 0).sum()) == sum(quotas) and kept.numel() == sum(quotas)
    for b, (start, end) in enumerate([(0, 128), (128, 256), (256, 300)]):
        block = w[:, start:end]
        expected = block.abs().flatten().topk(quotas[b]).values.min()
        chosen = values[:, start:end] != 0
        assert int(chosen.sum()) == quotas[b]
        assert block.abs()[chosen].min() >= expected
        assert torch.equal(values[:, start:end][chosen], block[chosen])  # H = I: nothing to compensate


def test_pruning_with_updates_beats_pruning_the_same_entries_without_them(monkeypatch):
    monkeypatch.setattr(sm, "SHRINKAGE", 0.0)  # the full H: the cross terms are what the updates compensate
    x = correlated_inputs(2000, 64)
    h = x.t() @ x / x.shape[0]
    r, u_inv = sm.damped_factors(h)
    w = torch.randn(20, 64, generator=torch.Generator().manual_seed(2))
    kept, values = sm.prune_with_updates(w, u_inv, [400])
    plain = torch.zeros(w.numel())
    plain[kept] = w.flatten()[kept]
    assert sm.error(w - values, r) < 0.9 * sm.error(w - plain.view_as(w), r)


def test_whitened_low_rank_is_the_best_fit_in_the_moment_norm():
    x = correlated_inputs(3000, 48)
    h = x.t() @ x / x.shape[0]
    r, _ = sm.damped_factors(h)
    w = torch.randn(30, 48, generator=torch.Generator().manual_seed(4))
    u, v = sm.whitened_low_rank(w, r, 6, "svd")
    tail = torch.linalg.svdvals((w @ r).double())[6:].square().sum().item()  # Eckart-Young in whitened space
    assert sm.error(w - u @ v, r) == pytest.approx(tail, rel=1e-3)
    plain_u, plain_v = best_low_rank(w, 6, solver="svd")
    assert sm.error(w - u @ v, r) < sm.error(w - plain_u @ plain_v, r)


def test_the_refit_lowers_the_output_error_of_the_rms_split_and_keeps_its_counts():
    x = correlated_inputs(4000, 96, seed=5)
    h = x.t() @ x / x.shape[0]
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(6))
    rank, nnz = 4, 900
    scale = h.diagonal().sqrt()
    u, v = best_low_rank(w * scale, rank)
    u, v, kept = alternating_refit(w * scale, u, v, nnz, 10, per_row=True)
    v = v / scale
    start = torch.zeros(w.numel())
    start[kept] = (w - u @ v).flatten()[kept]
    r, _ = sm.damped_factors(h)
    before = sm.error(w - u @ v - start.view_as(w), r)
    u2, v2, kept2, values2 = sm.second_moment_refit(w, u, v, kept, h, 3)
    after = torch.zeros(w.numel())
    after[kept2] = values2
    assert u2.shape == u.shape and v2.shape == v.shape and kept2.numel() == nnz
    assert torch.equal(kept2, kept2.sort().values)
    assert sm.error(w - u2 @ v2 - after.view_as(w), r) < 0.95 * before  # in the norm the fit minimises
    assert sm.column_quotas(kept2, 40, 96) == sm.column_quotas(kept, 40, 96)
    same = sm.second_moment_refit(w, u, v, kept, h, 0)  # no alternation: the start comes back
    assert torch.equal(same[2], kept) and torch.equal(same[0], u)


def test_second_moments_match_a_direct_computation_and_shared_inputs_are_counted_once_per_layer():
    model = tiny_llama()
    targets = find_target_modules(model, LowRankSparseConfig())
    inputs = {name: [] for name in targets}
    handles = [m.register_forward_pre_hook(lambda _m, a, n=name: inputs[n].append(a[0].reshape(-1, a[0].shape[-1])))
               for name, m in targets.items()]
    stats = dense_statistics(model, targets, WINDOWS, batch_size=3, second_moment=True)
    for h in handles:
        h.remove()
    moments = stats.second_moments()
    for name in targets:
        x = torch.cat(inputs[name]).double()
        assert torch.allclose(moments[name].double(), x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-6), name
    assert len(stats.counts["model.layers.0.self_attn.k_proj"]) == 3  # one count per batch, not per sharing layer
    with pytest.raises(RuntimeError, match="second_moment=True"):
        InputStatistics(targets).second_moments()


def layer_output_errors(dense: torch.nn.Module, compressed: torch.nn.Module) -> dict[str, float]:
    """||(W - W~) x||^2 summed over the dense model's calibration inputs of each compressed layer."""
    names = [n for n, m in compressed.named_modules() if isinstance(m, LowRankSparseLinear)]
    layers = {n: dense.get_submodule(n) for n in names}
    moments = dense_statistics(dense, layers, WINDOWS, second_moment=True).second_moments()
    errors = {}
    for n in names:
        diff = layers[n].weight.detach() - compressed.get_submodule(n).dense_weight().float()
        errors[n] = torch.einsum("ij,jk,ik->", diff.double(), moments[n].double(), diff.double()).item()
    return errors


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_compression_with_the_second_moment_objective_lowers_every_layers_output_error(arch):
    """Same statistics (one-shot), same start: the fit must lower what it optimises, layer by layer."""
    dense = BUILDERS[arch]()
    models = {}
    for objective in ("rms", "second_moment"):
        models[objective] = copy.deepcopy(dense)
        compress_(models[objective], LowRankSparseConfig(param_ratio=0.5, calibration_data=WINDOWS, refit=RefitConfig(objective=objective, block_matching_steps=0), calibration=CalibrationConfig(seq_len=32, num_samples=8)))  # the layer-wise fit alone
    rms, fitted = layer_output_errors(dense, models["rms"]), layer_output_errors(dense, models["second_moment"])
    assert all(fitted[n] <= rms[n] * (1 + 1e-5) for n in rms), {n: (rms[n], fitted[n]) for n in rms}
    assert sum(fitted.values()) < 0.9 * sum(rms.values())
    kept = models["second_moment"].config.quantization_config.compressed.modules
    assert kept == models["rms"].config.quantization_config.compressed.modules  # same ranks and counts


@pytest.mark.parametrize("pipeline", ["one_shot", "sequential"])
def test_the_second_moment_objective_is_deterministic(pipeline):
    def run() -> dict[str, torch.Tensor]:
        model = tiny_llama()
        compress_(model, LowRankSparseConfig(param_ratio=0.4, calibration_data=WINDOWS, refit=RefitConfig(objective="second_moment"), calibration=CalibrationConfig(pipeline=pipeline, seq_len=32, num_samples=8)))
        return model.state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)

