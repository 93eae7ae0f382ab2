"""Block output matching (`RefitConfig.block_matching_steps`): Adam steps on a compressed block's kept values."""

from __future__ import annotations

import copy

import pytest
import torch

from optimum_lrs import CalibrationConfig, CapAllocation, compress_, LowRankSparseConfig, LowRankSparseLinear, RefitConfig
from optimum_lrs import pipeline as compress_module
from optimum_lrs.block_matching import match_block
from optimum_lrs.sequential import decoder_blocks, first_block_inputs

from .conftest import BUILDERS, tiny_llama

WINDOWS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(3))


def config(matching: int | str = "auto", pipeline: str = "one_shot", allocation: str = "uniform") -> LowRankSparseConfig:
    allocation = CapAllocation(steps=2) if allocation == "cap" else allocation
    return LowRankSparseConfig(param_ratio=0.5, allocation=allocation, calibration_data=WINDOWS,
                               refit=RefitConfig(block_matching_steps=matching),
                               calibration=CalibrationConfig(seq_len=32, num_samples=8, pipeline=pipeline))


def layers_of(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def block_errors(dense: torch.nn.Module, compressed: torch.nn.Module) -> list[float]:
    """Each compressed block's relative output error against the dense block, both fed the dense model's
    hidden states (what one-shot matching targets)."""
    blocks = decoder_blocks(dense, layers_of(dense))
    dense_blocks = [b for _, b in blocks]
    comp_blocks = [b for _, b in decoder_blocks(compressed, {n: m for n, m in compressed.named_modules() if isinstance(m, LowRankSparseLinear)})]
    inputs = first_block_inputs(dense, blocks, WINDOWS, 4)
    errors = []
    with torch.no_grad():
        for d, c in zip(dense_blocks, comp_blocks):
            reference, outputs = inputs.forward(d), inputs.forward(c)
            errors.append(sum((o - r).square().sum().item() for o, r in zip(outputs, reference))
                          / sum(r.square().sum().item() for r in reference))
            inputs = inputs.advance(reference)
    return errors


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_matching_lowers_every_blocks_output_error_and_keeps_the_budget(arch):
    dense = BUILDERS[arch]()
    plain, matched = copy.deepcopy(dense), copy.deepcopy(dense)
    compress_(plain, config(matching=0))
    compress_(matched, config(matching=12))
    before, after = block_errors(dense, plain), block_errors(dense, matched)
    assert all(a < 0.9 * b for a, b in zip(after, before)), (before, after)
    assert plain.config.quantization_config.compressed.modules == matched.config.quantization_config.compressed.modules
    for name, layer in matched.named_modules():
        if isinstance(layer, LowRankSparseLinear):
            other = plain.get_submodule(name)
            assert torch.equal(layer.sparse_bitmask, other.sparse_bitmask)  # positions fixed: values move
            assert not torch.equal(layer.sparse_values, other.sparse_values)
            assert not layer.lowrank_u.requires_grad and layer.csr_problem() is None
    assert all(p.requires_grad for n, p in matched.named_parameters() if "norm" in n)  # restored


def test_matching_keeps_the_start_and_warns_when_every_step_size_makes_the_block_worse(monkeypatch, caplog):
    """With step sizes that overshoot, the layer-wise fit is handed back unchanged, each block says so at
    WARNING with its error, and the result record counts no block gained."""
    monkeypatch.setattr("optimum_lrs.block_matching.RELATIVE_STEPS", (10.0, 5.0))
    dense = tiny_llama()
    plain, matched = copy.deepcopy(dense), copy.deepcopy(dense)
    compress_(plain, config(matching=0))
    with caplog.at_level("WARNING", logger="optimum_lrs"):
        compress_(matched, config(matching=3))
    a, b = plain.state_dict(), matched.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    result = matched.config.quantization_config.compressed
    assert result.blocks_gained == 0 and set(result.block_matching) == {"model.layers.0", "model.layers.1"}
    assert all(r["step"] == 0.0 and r["after"] == r["before"] > 0 for r in result.block_matching.values())
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for prefix, r in result.block_matching.items():
        assert any(m.startswith(f"{prefix}: block matching left the block output error at {r['before']:.4f}")
                   for m in warned), warned
    assert "block matching lowered the output error of 0 of 2 decoder blocks" in warned
    assert plain.config.quantization_config.compressed.block_matching is None  # matching=0: nothing ran


def test_matching_falls_back_to_a_smaller_step_where_the_first_overshoots(monkeypatch):
    """The first step size overshoots on every block; the next one, from the layer-wise fit again, is what
    steps of that size alone give."""
    dense = tiny_llama()
    fallback, direct = copy.deepcopy(dense), copy.deepcopy(dense)
    monkeypatch.setattr("optimum_lrs.block_matching.RELATIVE_STEPS", (10.0, 0.01))
    compress_(fallback, config(matching=4))
    monkeypatch.setattr("optimum_lrs.block_matching.RELATIVE_STEPS", (0.01,))
    compress_(direct, config(matching=4))
    a, b = fallback.state_dict(), direct.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    result = fallback.config.quantization_config.compressed
    assert result.blocks_gained == 2 and all(r["step"] == 0.01 for r in result.block_matching.values())


def test_match_block_reports_the_error_before_and_after():
    dense = tiny_llama()
    model = copy.deepcopy(dense)
    compress_(model, config())
    block = model.model.layers[0]
    inputs = first_block_inputs(dense, decoder_blocks(dense, layers_of(dense)), WINDOWS, 4)
    with torch.no_grad():
        targets = inputs.forward(dense.model.layers[0])
    layers = {n: m for n, m in block.named_modules() if isinstance(m, LowRankSparseLinear)}
    result = match_block(block, layers, inputs.hidden, inputs.block_kwargs, targets, 10)
    assert 0 < result.after < result.before and result.gained
    assert all(block.get_submodule(n) is m for n, m in layers.items())  # the layers themselves are back


@pytest.mark.parametrize("pipeline,allocation", [("sequential", "uniform"), ("one_shot", "uniform"),
                                                 ("one_shot", "cap"), ("sequential", "global_greedy")])
def test_matching_is_deterministic(pipeline, allocation):
    def run() -> tuple[dict[str, torch.Tensor], dict]:
        model = tiny_llama()
        compress_(model, config(matching=5, pipeline=pipeline, allocation=allocation))
        return model.state_dict(), model.config.quantization_config.compressed.block_matching

    (a, record_a), (b, record_b) = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert record_a == record_b and len(record_a) == 2


@pytest.mark.parametrize("allocation", ["global_greedy", "cap"])
def test_matching_after_a_global_allocation_lowers_every_blocks_output_error(allocation):
    dense = tiny_llama()
    plain, matched = copy.deepcopy(dense), copy.deepcopy(dense)
    compress_(plain, config(allocation=allocation, matching=0))
    compress_(matched, config(allocation=allocation, matching=12))
    assert plain.config.quantization_config.compressed.modules == matched.config.quantization_config.compressed.modules
    before, after = block_errors(dense, plain), block_errors(dense, matched)
    assert all(a < 0.9 * b for a, b in zip(after, before)), (before, after)


def test_matching_needs_decoder_blocks(monkeypatch):
    monkeypatch.setattr(compress_module, "find_decoder_blocks", lambda *_: (None, "no decoder blocks found"))
    with pytest.raises(ValueError, match="no decoder blocks"):
        compress_(tiny_llama(), config(matching=4))
    # "auto" (the default) compresses such a model without matching: whole-model statistics
    auto, none = tiny_llama(), tiny_llama()
    compress_(auto, config())
    compress_(none, config(matching=0))
    a, b = auto.state_dict(), none.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_matching_runs_eight_steps_where_the_compression_calibrates_and_none_where_it_does_not():
    explicit, auto = tiny_llama(), tiny_llama()
    compress_(explicit, config(matching=8))
    compress_(auto, config())
    a, b = explicit.state_dict(), auto.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert auto.config.quantization_config.refit.block_matching_steps == "auto"
    free = LowRankSparseConfig(param_ratio=0.5, activation_aware=False)  # uniform: calibration-free
    assert not free.needs_calibration and free.matching_steps == 8
    assert LowRankSparseConfig(activation_aware=False, refit=RefitConfig(block_matching_steps=2)).needs_calibration
    plain, calibration_free = tiny_llama(), tiny_llama()
    compress_(calibration_free, free)
    compress_(plain, LowRankSparseConfig(param_ratio=0.5, activation_aware=False, refit=RefitConfig(block_matching_steps=0)))
    a, b = plain.state_dict(), calibration_free.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
