"""Every factor dtype the config accepts, under either dtype of the compression's search forwards (precision.py
picks bfloat16 on CPUs with AVX512-BF16 and float32 elsewhere; both are forced here, so every machine tests both):
the compressed float32 model runs, saves and reloads with identical logits, in the factors' dtype, and its
values stay those of the float32-factor compression up to the rounding of the factors."""

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_lrs import LowRankSparseConfig, LowRankSparseLinear, compress_, precision

from .conftest import tiny_llama

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
CALIBRATION = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


@functools.cache
def compressed_logits(factor_dtype: str, search: torch.dtype) -> tuple[torch.Tensor, torch.nn.Module]:
    original = precision.search_dtype
    precision.search_dtype = lambda device: search
    try:
        model = compress_(tiny_llama(), LowRankSparseConfig(param_ratio=0.5, factor_dtype=factor_dtype,
                                                            calibration_data=CALIBRATION))
    finally:
        precision.search_dtype = original
    return logits(model), model


@pytest.mark.parametrize("search", [torch.bfloat16, torch.float32], ids=["search-bf16", "search-f32"])
@pytest.mark.parametrize("factor_dtype", ["float32", "bfloat16", "float16"])
def test_factor_dtypes_under_both_search_dtypes(factor_dtype, search, tmp_path):
    out, model = compressed_logits(factor_dtype, search)
    layers = [m for m in model.modules() if isinstance(m, LowRankSparseLinear)]
    assert len(layers) == 14 and {layer.factor_dtype for layer in layers} == {getattr(torch, factor_dtype)}
    dense = logits(tiny_llama())
    # measured 0.227 for every case (2026-12-07); zeroed layers give 0.58
    assert torch.linalg.norm(out - dense) < 0.35 * torch.linalg.norm(dense)
    # the factors' rounding only: measured at most 0.0036 (bfloat16) and 0.0006 (float16) from float32 factors
    reference, _ = compressed_logits("float32", search)
    assert torch.linalg.norm(out - reference) < 0.012 * torch.linalg.norm(reference)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert {m.factor_dtype for m in again.modules() if isinstance(m, LowRankSparseLinear)} == {getattr(torch, factor_dtype)}
    assert torch.equal(logits(again), out)
