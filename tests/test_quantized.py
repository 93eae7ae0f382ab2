"""Quantized factors (`LowRankSparseConfig(quantization=...)`): compression, save and reload, the format
version, sizes, bad input, and LoRA on top."""

import json
import logging
import re

import pytest
import torch
from peft import get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from optimum_lrs import (FactorQuantization, LowRankSparseConfig, LowRankSparseLinear, LowRankSparseLoraConfig,
                         QuantizedLowRankSparseLinear, model_card)
from optimum_lrs import config as config_module
from optimum_lrs.nn.quantized_linear import QUANTIZED_FACTORS

GROUP = 32  # divides the tiny models' widths (64, 128, 160)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankSparseLinear)}


@pytest.fixture(scope="module")
def compressed(dense_checkpoint):
    """The same compression with float factors and with 8- and 4-bit codes."""
    out = {}
    for bits in (None, 8, 4):
        quantization = None if bits is None else FactorQuantization(bits=bits, group_size=GROUP)
        cfg = LowRankSparseConfig(param_ratio=0.5, quantization=quantization)
        out[bits] = AutoModelForCausalLM.from_pretrained(dense_checkpoint, quantization_config=cfg)
    return out


def test_every_layer_holds_codes_and_the_bytes_shrink(compressed):
    floats, four = layers(compressed[None]), layers(compressed[4])
    assert floats.keys() == four.keys() and all(isinstance(m, QuantizedLowRankSparseLinear) for m in four.values())
    for name, layer in four.items():
        assert (layer.rank, layer.nnz, layer.bits, layer.group_size) == (floats[name].rank, floats[name].nnz, 4, GROUP)
        assert layer.lowrank_u_codes.dtype == torch.uint8
        assert {n for n, _ in layer.named_parameters()} - {"bias"} == {f"{f}_scales" for f in QUANTIZED_FACTORS}
    # bitmask and bias bytes, the same in every model
    shared = sum(t.numel() * t.element_size() for m in floats.values() for t in (*m.buffers(), m.bias) if t is not None)
    factor_bytes = {bits: sum(m.nbytes for m in layers(model).values()) - shared for bits, model in compressed.items()}
    # float32 factors against 4-bit codes with a float32 scale per 32: 8 * 32 / (4 * 32 + 32) = 6.4x smaller
    assert factor_bytes[None] / factor_bytes[4] == pytest.approx(6.4, rel=0.02)
    assert factor_bytes[8] / factor_bytes[4] == pytest.approx((1 + 4 / 32) / (0.5 + 4 / 32), rel=0.02)


def test_codes_cost_little_accuracy_at_eight_bits_and_some_at_four(dense_checkpoint, compressed, input_ids):
    dense = logits(AutoModelForCausalLM.from_pretrained(dense_checkpoint), input_ids)
    error = {bits: ((logits(m, input_ids) - dense).norm() / dense.norm()).item() for bits, m in compressed.items()}
    # Measured (llama / qwen2): float factors 0.244 / 0.236, 8 bits 0.244 / 0.236, 4 bits 0.248 / 0.253. Eight
    # bits move the model by far less than compression did; four bits cost something (so the codes are used)
    # and stay far from a zeroed model (1.0).
    assert abs(error[8] - error[None]) < 0.01 * error[None] + 1e-3
    assert error[None] < error[4] < 1.5 * error[None]


def test_codes_fitted_to_the_inputs_move_the_model_less_than_rounding_to_nearest(dense_checkpoint, compressed,
                                                                                 input_ids):
    nearest = AutoModelForCausalLM.from_pretrained(dense_checkpoint, quantization_config=LowRankSparseConfig(
        param_ratio=0.5, quantization=FactorQuantization(bits=4, group_size=GROUP, rounding="nearest")))
    fitted = compressed[4]
    dense = logits(AutoModelForCausalLM.from_pretrained(dense_checkpoint), input_ids)
    error = {name: ((logits(m, input_ids) - dense).norm() / dense.norm()).item()
             for name, m in (("fitted", fitted), ("nearest", nearest))}
    # Measured (llama / qwen2): fitted 0.248 / 0.253, rounded to nearest with error feedback 0.250 / 0.263
    assert error["fitted"] < error["nearest"], error
    name, layer = next(iter(layers(fitted).items()))
    assert not torch.equal(layer.sparse_values_codes, layers(nearest)[name].sparse_values_codes)


def test_a_model_without_decoder_blocks_gets_codes_fitted_to_the_dense_inputs(dense_checkpoint, input_ids,
                                                                              monkeypatch):
    """The whole-model pass (no decoder blocks found) stores its layers as the block pipeline does: codes fitted to
    the dense model's inputs, layers reading the same inputs fitted together."""
    from optimum_lrs import pipeline

    monkeypatch.setattr(pipeline, "find_decoder_blocks", lambda *_: (None, "no decoder blocks found"))
    models = {rounding: AutoModelForCausalLM.from_pretrained(dense_checkpoint, quantization_config=LowRankSparseConfig(
        param_ratio=0.5, quantization=FactorQuantization(bits=4, group_size=GROUP, rounding=rounding)))
        for rounding in ("gptq", "nearest")}
    fitted, nearest = layers(models["gptq"]), layers(models["nearest"])
    assert all(isinstance(m, QuantizedLowRankSparseLinear) for m in (*fitted.values(), *nearest.values()))
    assert all(not torch.equal(m.sparse_values_codes, nearest[name].sparse_values_codes) for name, m in fitted.items())
    dense = logits(AutoModelForCausalLM.from_pretrained(dense_checkpoint), input_ids)
    error = {name: ((logits(m, input_ids) - dense).norm() / dense.norm()).item() for name, m in models.items()}
    # Measured (llama / qwen2): fitted 0.261 / 0.259, rounded to nearest 0.256 / 0.268; a zeroed model 1.0. Without
    # blocks the codes fit the dense model's inputs, not the compressed model's, and need not beat rounding here.
    assert max(error.values()) < 0.35, error


def test_matching_the_scales_lowers_every_blocks_output_error_and_keeps_the_codes(dense_checkpoint, compressed,
                                                                                 input_ids, caplog):
    """`match_scales` (default on): each block matched again on its groups' scales once its codes are stored.
    Against the same compression without it: the codes are the same, the scales differ, and every block's first
    calibration batch error drops, as the log reports it (measured on the tiny llama / qwen2: 0.081 -> 0.078 and
    0.103 -> 0.100 / 0.078 -> 0.076 and 0.095 -> 0.093; on SmolLM2 the perplexity: docs/research-notes.md)."""
    unmatched = AutoModelForCausalLM.from_pretrained(dense_checkpoint, quantization_config=LowRankSparseConfig(
        param_ratio=0.5, quantization=FactorQuantization(bits=4, group_size=GROUP, match_scales=False)))
    with caplog.at_level(logging.INFO, logger="optimum_lrs.pipeline"):
        matched = AutoModelForCausalLM.from_pretrained(dense_checkpoint, quantization_config=LowRankSparseConfig(
            param_ratio=0.5, quantization=FactorQuantization(bits=4, group_size=GROUP)))
    notes = re.findall(r"scales, first batch's block output error ([0-9.]+) -> ([0-9.]+)", caplog.text)
    assert len(notes) == 2 and all(float(after) < float(before) for before, after in notes), notes
    for (name, a), b in zip(layers(matched).items(), layers(unmatched).values()):
        assert all(torch.equal(getattr(a, f"{n}_codes"), getattr(b, f"{n}_codes")) for n in QUANTIZED_FACTORS), name
    assert any(not torch.equal(a.sparse_values_scales, b.sparse_values_scales)
               for a, b in zip(layers(matched).values(), layers(unmatched).values()))
    torch.testing.assert_close(logits(matched, input_ids), logits(compressed[4], input_ids))  # the default


def test_saved_codes_reload_without_recompressing_and_give_identical_logits(compressed, input_ids, tmp_path):
    model = compressed[4]
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["format_version"] == config_module.QUANTIZED_FORMAT_VERSION
    assert saved["quantization"] == {"bits": 4, "group_size": GROUP, "rounding": "gptq", "error_feedback": True,
                                   "refit_scales": True, "match_scales": True}
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    name = next(iter(layers(model)))
    assert {f"{name}.lowrank_u_codes", f"{name}.sparse_values_scales", f"{name}.sparse_bitmask"} <= keys
    assert f"{name}.lowrank_u" not in keys
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(isinstance(m, QuantizedLowRankSparseLinear) for m in layers(reloaded).values())
    assert torch.equal(logits(reloaded, input_ids), logits(model, input_ids))
    half = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(m.lowrank_u_scales.dtype == torch.bfloat16 and m.lowrank_u_codes.dtype == torch.uint8
               for m in layers(half).values())
    ref = logits(model, input_ids)
    assert (logits(half, input_ids).float() - ref).norm() < 0.05 * ref.norm()


def test_float_checkpoints_stay_readable_by_format_2_readers(compressed, tmp_path):
    compressed[None].save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["format_version"] == 2


def test_an_older_reader_refuses_quantized_factors_by_their_format_version(compressed, tmp_path, monkeypatch):
    compressed[8].save_pretrained(tmp_path)
    monkeypatch.setattr(config_module, "READABLE_FORMATS", (1, 2))  # what the reader before format 3 accepted
    with pytest.raises(ValueError, match="format_version 3 is not supported by this optimum_lrs"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_codes_without_quantization_in_config_json_are_refused(compressed, tmp_path):
    compressed[4].save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["quantization_config"]["quantization"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="holds integer codes but config.json says no quantization"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_group_size_that_does_not_divide_a_layer_is_refused_before_compressing(dense_checkpoint):
    cfg = LowRankSparseConfig(param_ratio=0.5, quantization={"bits": 4, "group_size": 48})
    with pytest.raises(ValueError, match=r"quantization: layer '.*': group_size=48 does not divide (out|in)_features="):
        AutoModelForCausalLM.from_pretrained(dense_checkpoint, quantization_config=cfg)


def test_the_bits_alone_mean_the_default_group(compressed):
    assert LowRankSparseConfig(quantization=4).quantization == FactorQuantization(bits=4, group_size=64,
                                                                                  error_feedback=True)


def test_lora_trains_on_quantized_factors_and_merging_is_refused(compressed, input_ids, tmp_path):
    compressed[4].save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path)
    model = get_peft_model(base, LowRankSparseLoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="cannot merge LoRA into quantized factors"):
        model.merge_and_unload()


def test_the_model_card_says_the_factors_are_codes(compressed):
    from optimum_lrs.io.model_card import model_card

    assert "4-bit integer codes with one scale per 32 values" in model_card(compressed[4]).text
    assert "integer codes" not in model_card(compressed[None]).text


def test_a_layer_rounds_each_factor_in_its_own_groups():
    """U's columns, V's rows and the values' stream each get their own scales: a column a thousand times smaller
    than its neighbours keeps its values (groups along the rank would round it to zero)."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(64, 3, generator=g) * torch.tensor([1e-3, 1.0, 1e3])
    v = torch.randn(3, 96, generator=g) * torch.tensor([[1e3], [1.0], [1e-3]])
    sparse = torch.zeros(64, 96)
    sparse.view(-1)[torch.randperm(64 * 96, generator=g)[:70]] = 1.0
    layer = LowRankSparseLinear.from_factors(u, v, sparse).with_sparse_format("bitmask")
    layer.sparse_values.data[-6:] = 100.0  # the last, partial group of 32 has its own scale
    q = QuantizedLowRankSparseLinear.quantize(layer, 4, 32)
    assert q.nnz == 70 and q.sparse_values.shape == (70,) and q.sparse_values_scales.shape == (3,)
    for got, want in ((q.lowrank_u.t(), u.t()), (q.lowrank_v, v), (q.sparse_values[None], layer.sparse_values[None])):
        rel = (got - want).norm(dim=1) / want.norm(dim=1)
        assert bool((rel < 0.15).all()), rel
    x = torch.randn(5, 96, generator=g)
    assert torch.allclose(q(x), x @ q.dense_weight().t(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("byte_ratio, quantization", [(0.3, FactorQuantization(bits=4, group_size=GROUP)), (0.6, None)])
def test_a_byte_budget_is_met_within_half_a_percent(dense_checkpoint, byte_ratio, quantization, tmp_path):
    cfg = LowRankSparseConfig(byte_ratio=byte_ratio, quantization=quantization)
    model = AutoModelForCausalLM.from_pretrained(dense_checkpoint, quantization_config=cfg)
    compressed = layers(model)
    dense_bf16 = 2 * sum(m.in_features * m.out_features for m in compressed.values())
    # the bytes as stored: every tensor of the compressed layers but the bias (float32 factors without codes)
    stored = sum(t.numel() * t.element_size() for m in compressed.values()
                 for name, t in [*m.named_parameters(), *m.named_buffers()] if name != "bias")
    assert stored / dense_bf16 == pytest.approx(byte_ratio, rel=0.005)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (saved["byte_ratio"], saved["param_ratio"]) == (byte_ratio, None)
    assert f"| byte_ratio={byte_ratio} |" in str(model_card(model))


def test_a_byte_budget_below_the_bitmask_alone_is_refused(dense_checkpoint):
    # the bitmask takes 1/16 of the dense bfloat16 bytes
    with pytest.raises(ValueError, match=r"byte_ratio=0.05 is below what the bitmask layout alone takes \(0.0625"):
        AutoModelForCausalLM.from_pretrained(dense_checkpoint,
                                             quantization_config=LowRankSparseConfig(byte_ratio=0.05, quantization=4))
