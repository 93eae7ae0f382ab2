"""Compression must not depend on the scale of a model's weights: a copy rescaled without changing its function
(benchmarks/reparameterize.py: up_proj x c with down_proj / c, v_proj x c with o_proj / c) compresses to the
same function as the original, block matching included."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from optimum_lrs import compress_, precision

from .conftest import REPO, tiny_gemma, tiny_llama
from .test_block_matching import WINDOWS, config

_spec = importlib.util.spec_from_file_location("reparameterize", REPO / "benchmarks" / "reparameterize.py")
reparameterize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reparameterize)

SCALES = (0.1, 10.0)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def test_the_rescaled_copy_computes_the_same_function():
    dense = tiny_llama()
    for c in SCALES:
        rescaled = reparameterize.rescale_pairs(copy.deepcopy(dense), c)
        assert relative(rescaled(WINDOWS).logits, dense(WINDOWS).logits) < 1e-5
        assert relative(rescaled.model.layers[0].mlp.up_proj.weight, dense.model.layers[0].mlp.up_proj.weight) > 0.8
    with pytest.raises(ValueError, match="no .* layers in this"):
        reparameterize.rescale_pairs(torch.nn.Sequential(torch.nn.Linear(2, 2)), 2.0)


def compress_copies(dense: torch.nn.Module, pipeline: str, allocation: str) -> dict[float, torch.nn.Module]:
    """The original (c = 1) and each rescaled copy, compressed with block matching."""
    out = {}
    for c in (1.0, *SCALES):
        model = reparameterize.rescale_pairs(copy.deepcopy(dense), c) if c != 1.0 else copy.deepcopy(dense)
        compress_(model, config(matching=8, pipeline=pipeline, allocation=allocation))
        out[c] = model
    return out


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gemma], ids=["llama", "gemma"])
@pytest.mark.parametrize("pipeline,allocation", [("one_shot", "uniform"), ("sequential", "uniform"),
                                                 ("one_shot", "cap"), ("sequential", "cap")])
@torch.no_grad()
def test_a_rescaled_copy_compresses_to_the_same_function(builder, pipeline, allocation, monkeypatch):
    """With the search forwards (matching's steps, CAP's losses) in float32, the compression is equivariant to the
    rescaling up to float32 rounding: the same allocation (up to one sparse entry that rounding settles in
    another layer) and logits within 0.5% of what compression changes (measured: at most 0.24%). In bfloat16 (the
    search precision where the CPU has it) the copy's roundings differ, so its logits may differ as much as
    bfloat16 itself moves them from float32's (measured: 0.4x to 1.7x on AVX-512 machines), or, where that
    difference happens to be small, by a small share of the compression's change (on an AVX2-only EPYC, one-shot
    CAP on llama: 4.2x the bfloat16 difference, 7% of the compression's change). Absolute Adam step sizes, as
    block matching took before it became relative, moved the logits by 150% of the compression's change, 90x the
    bfloat16 difference."""
    dense = builder()
    reference = dense(WINDOWS).logits
    logits = {}
    for search in (torch.float32, torch.bfloat16):
        monkeypatch.setattr(precision, "search_dtype", lambda device, dtype=search: dtype)  # each branch, anywhere
        for c, model in compress_copies(dense, pipeline, allocation).items():
            result = model.config.quantization_config.compressed
            assert result.blocks_gained == 2, (search, c, result.block_matching)  # matching ran and helped
            logits[search, c] = model(WINDOWS).logits
            if search == torch.float32:
                counts = [(e["rank"], e["nnz"]) for e in result.modules.values()]
                if c == 1.0:
                    original = counts
                assert all(r == r1 and abs(n - n1) <= 1 for (r, n), (r1, n1) in zip(counts, original)), c
    error = relative(logits[torch.float32, 1.0], reference)  # what compression changes
    bf16_noise = relative(logits[torch.bfloat16, 1.0], logits[torch.float32, 1.0])
    for c in SCALES:
        assert relative(logits[torch.float32, c], logits[torch.float32, 1.0]) < 5e-3 * error, c
        assert relative(logits[torch.bfloat16, c], logits[torch.bfloat16, 1.0]) < max(2.5 * bf16_noise, 0.15 * error), c
