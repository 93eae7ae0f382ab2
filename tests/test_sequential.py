"""The sequential pipeline: block by block, each calibrated on what the compressed blocks before it output."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from optimum_lrs import CalibrationConfig, CapAllocation, LowRankSparseConfig, LowRankSparseLinear, RefitConfig, compress_
from optimum_lrs import pipeline as compress_module
from optimum_lrs.stage1 import decompose as decompose_module
from optimum_lrs.stage1.activations import input_rms
from optimum_lrs.sequential import decoder_blocks

from .conftest import BUILDERS, MIXED_ATTENTION

WINDOWS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(3))


def config(allocation: str, pipeline: str, matching: int | str = "auto") -> LowRankSparseConfig:
    return LowRankSparseConfig(param_ratio=0.5, allocation=CapAllocation(steps=2) if allocation == "cap" else allocation,
                               calibration_data=WINDOWS, refit=RefitConfig(block_matching_steps=matching),
                               calibration=CalibrationConfig(seq_len=32, num_samples=8, pipeline=pipeline))


def compressed(build, cfg: LowRankSparseConfig) -> nn.Module:
    model = build()
    compress_(model, cfg)
    return model


ARCHITECTURES = {**BUILDERS, **MIXED_ATTENTION}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("allocation", ["uniform", "global_greedy", "cap"])
def test_one_shot_block_by_block_equals_the_whole_model_pass_bit_for_bit(arch, allocation, monkeypatch):
    """Fed the dense blocks' outputs, the block-by-block machinery (blocks' inputs caught, blocks run one at
    a time, statistics per block, uniform shares per block) must rebuild exactly the model of one whole-model
    statistics pass, which is what a model without findable decoder blocks still gets; gemma 2's blocks each
    get their own attention mask (sliding window, full)."""
    calls = []
    original_first = compress_module.first_block_inputs
    monkeypatch.setattr(compress_module, "first_block_inputs", lambda *a: calls.append(1) or original_first(*a))
    by_blocks_cfg = config(allocation, "one_shot", matching=0)  # matching needs the blocks
    by_blocks = compressed(ARCHITECTURES[arch], by_blocks_cfg)
    assert calls == [1]

    monkeypatch.setattr(compress_module, "find_decoder_blocks", lambda *_: (None, "no blocks"))
    whole_cfg = config(allocation, "one_shot", matching=0)
    whole = compressed(ARCHITECTURES[arch], whole_cfg)
    assert calls == [1]
    a, b = whole.state_dict(), by_blocks.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    allocated = whole.config.quantization_config.compressed.modules
    assert len(allocated) == 14 and allocated == by_blocks.config.quantization_config.compressed.modules
    with pytest.raises(ValueError, match="no blocks"):  # propagated statistics cannot do without blocks
        compressed(ARCHITECTURES[arch], config(allocation, "sequential"))


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_each_block_is_calibrated_on_the_compressed_blocks_before_it(arch, monkeypatch):
    """The activation scales Stage 1 used for block b are the input RMS of b's layers in the model whose blocks
    before b are the final compressed ones and whose block b is still dense."""
    seen = {}
    original = decompose_module.decompose

    def recording(name, module, cfg, column_scale=None, max_rank=None):
        seen[name] = column_scale.clone()
        return original(name, module, cfg, column_scale, max_rank)

    monkeypatch.setattr(decompose_module, "decompose", recording)
    dense = BUILDERS[arch]()
    model = copy.deepcopy(dense)
    compress_(model, config("uniform", "sequential"))
    blocks = model.model.layers
    propagated_differs = False
    for b in range(len(blocks)):
        hybrid = copy.deepcopy(model)
        hybrid.model.layers[b] = copy.deepcopy(dense.model.layers[b])
        layers = {n: m for n, m in hybrid.named_modules() if n.startswith(f"model.layers.{b}.") and isinstance(m, nn.Linear)}
        expected = input_rms(hybrid, layers, WINDOWS)
        dense_layers = {n: m for n, m in dense.named_modules() if n in layers}
        one_shot = input_rms(dense, dense_layers, WINDOWS)
        for name in layers:
            torch.testing.assert_close(seen[name], expected[name], rtol=1e-5, atol=1e-7)
            propagated_differs |= not torch.allclose(seen[name], one_shot[name], rtol=1e-4)
    assert propagated_differs  # from the second block on, the inputs are no longer the dense model's


def test_the_sequential_model_meets_the_budget_and_differs_from_one_shot():
    for allocation in ("uniform", "cap"):
        cfg = config(allocation, "sequential")
        model = compressed(BUILDERS["llama"], cfg)
        layers = [m for m in model.modules() if isinstance(m, LowRankSparseLinear)]
        kept = sum(m.rank * (m.in_features + m.out_features) + m.nnz for m in layers)
        dense = sum(m.in_features * m.out_features for m in layers)
        assert abs(kept - round(0.5 * dense)) <= 1e-3 * dense
        assert len(model.config.quantization_config.compressed.modules) == 14
        again = compressed(BUILDERS["llama"], config(allocation, "sequential"))
        a, b = model.state_dict(), again.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic
        one_shot = compressed(BUILDERS["llama"], config(allocation, "one_shot")).state_dict()
        assert not all(torch.equal(a[k], one_shot[k]) for k in a)


def test_blocks_are_found_and_targets_outside_them_are_refused():
    model = BUILDERS["qwen2"]()
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert [name for name, _ in decoder_blocks(model, targets)] == ["model.layers.0", "model.layers.1"]

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    flat = Flat()
    with pytest.raises(ValueError, match="cannot find the decoder blocks.*pipeline='one_shot'"):
        decoder_blocks(flat, {"a": flat.a, "b": flat.b})

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(2)])
            self.projector = nn.Linear(4, 4)

    mixed = Mixed()
    targets = {n: m for n, m in mixed.named_modules() if isinstance(m, nn.Linear)}
    with pytest.raises(ValueError, match=r"\['projector'\] lie outside them"):
        decoder_blocks(mixed, targets)

