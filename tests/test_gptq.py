"""Codes fitted to a layer's inputs (`nn.gptq`, `QuantizedLowRankSparseLinear.quantize(..., second_moment=)`):
the sweep against rounding to nearest, on random weights and on a compressed tiny model's real layers."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_lrs import LowRankSparseConfig, LowRankSparseLinear, QuantizedLowRankSparseLinear
from optimum_lrs.nn.gptq import gptq_codes, output_error
from optimum_lrs.nn.quantize import quantize_groups
from optimum_lrs.stage1.activations import InputStatistics

GROUP = 32


def correlated_inputs(tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Inputs with mixed features and uneven scales, as a layer's inputs are (an identity H would make the sweep
    round to nearest)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim ** 0.5 + torch.eye(dim)
    return torch.randn(tokens, dim, generator=g) @ mix * (0.2 + 3 * torch.rand(dim, generator=g))


def test_an_identity_second_moment_rounds_to_nearest():
    weight = torch.randn(16, 64)
    codes, scales = quantize_groups(weight, 4, GROUP)
    swept = gptq_codes(weight, torch.eye(64), scales.repeat_interleave(GROUP, -1), 7)
    assert torch.equal(swept, codes)


def test_codes_stay_in_range_zero_outside_keep_and_lower_the_output_error():
    weight = torch.randn(24, 96)
    x = correlated_inputs(2048, 96)
    h = x.t() @ x / x.shape[0]
    keep = torch.rand(24, 96) < 0.5
    scales = quantize_groups(weight, 4, GROUP)[1].repeat_interleave(GROUP, -1)
    scales[0, :GROUP] = 0.0  # a zero group
    codes = gptq_codes(weight, h, scales, 7, keep)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 7
    assert not codes[~keep].any() and not codes[0, :GROUP].any()
    nearest = torch.round(weight / scales.clamp_min(1e-30)).clamp(-7, 7) * keep * (scales > 0)
    # the sweep moves rounding (and pruning) errors onto columns not yet rounded: a lower output error than
    # rounding each entry, where the pruned half's values dominate both (measured: 0.83x)
    assert output_error(weight, codes * scales, h) < 0.9 * output_error(weight, nearest * scales, h)


@pytest.fixture(scope="module")
def float_model(dense_checkpoint):
    return AutoModelForCausalLM.from_pretrained(dense_checkpoint,
                                                quantization_config=LowRankSparseConfig(param_ratio=0.5))


@pytest.mark.parametrize("bits", [4, 8])
def test_the_fit_lowers_every_layers_objective_against_rounding_after_the_fit(float_model, bits):
    layers = {n: m for n, m in float_model.named_modules() if isinstance(m, LowRankSparseLinear)}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, float_model.config.vocab_size, (4, 64), generator=g)
    with torch.no_grad(), InputStatistics(layers, second_moment=True) as stats:
        float_model(ids)
    moments = stats.second_moments()
    ratios = []
    for name, layer in layers.items():
        weight = layer.dense_weight().float()
        fitted = QuantizedLowRankSparseLinear.quantize(layer, bits, GROUP, second_moment=moments[name])
        nearest = QuantizedLowRankSparseLinear.quantize(layer, bits, GROUP, error_feedback=True)
        assert (fitted.rank, fitted.nnz) == (layer.rank, layer.nnz)
        assert all(torch.equal(getattr(fitted, n), getattr(layer, n)) for n in layer.storage.index_names())
        ratios.append(output_error(weight, fitted.dense_weight(), moments[name])
                      / output_error(weight, nearest.dense_weight(), moments[name]))
    # every layer's output error on its calibration inputs is below error feedback's (the best rounding to nearest
    # here). Measured on the tiny llama / qwen2 (random token inputs): medians 0.90 / 0.90 at 4 bits and 0.90 /
    # 0.88 at 8, worst layers 0.94 / 0.98; on SmolLM2 0.25-0.65 (docs/research-notes.md).
    assert max(ratios) < 0.99, ratios
    assert sorted(ratios)[len(ratios) // 2] < 0.95, ratios
