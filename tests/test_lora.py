"""PEFT LoRA on compressed tiny models: train, save, reload in a fresh process, merge, unmerge, Trainer."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from optimum_lrs import (
    LowRankSparseConfig,
    LowRankSparseLinear,
    LowRankSparseLoraConfig,
    LowRankSparseLoraLinear,
    lora_target_modules,
)

from .conftest import run_python, tiny_llama


@pytest.fixture(scope="module")
def compressed_dir(dense_with_tokenizer, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(dense_with_tokenizer, quantization_config=LowRankSparseConfig(param_ratio=0.5))
    out = tmp_path_factory.mktemp("lora-compressed")
    model.save_pretrained(out)
    return out


def load(path, dtype=None):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def lora_config(**kwargs):
    return LowRankSparseLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **kwargs)


def factors(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items() if "lowrank" in n or "sparse" in n}


def train_steps(model, ids, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_lora_wraps_compressed_layers_and_trains_only_the_adapter(compressed_dir, input_ids):
    model = get_peft_model(load(compressed_dir), lora_config())
    wrapped = [m for m in model.modules() if isinstance(m, LowRankSparseLoraLinear)]
    assert len(wrapped) == 6  # 3 targets x 2 layers
    before = factors(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    train_steps(model, input_ids)
    after = factors(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


def test_all_compressed_layers_helper(compressed_dir):
    model = load(compressed_dir)
    names = lora_target_modules(model)
    assert len(names) == 14
    peft_model = get_peft_model(model, LowRankSparseLoraConfig(r=2, target_modules=names))
    assert sum(isinstance(m, LowRankSparseLoraLinear) for m in peft_model.modules()) == 14
    with pytest.raises(ValueError, match="no LowRankSparseLinear"):
        lora_target_modules(tiny_llama())


def test_factors_keep_their_half_precision_dtype(compressed_dir, input_ids):
    model = get_peft_model(load(compressed_dir, dtype=torch.bfloat16), lora_config())
    train_steps(model, input_ids, steps=1)
    base = [m.get_base_layer() for m in model.modules() if isinstance(m, LowRankSparseLoraLinear)]
    assert all(b.lowrank_u.dtype == torch.bfloat16 and b.sparse_values.dtype == torch.bfloat16 for b in base)


def test_adapter_save_and_reload_in_fresh_process(compressed_dir, input_ids, tmp_path):
    model = get_peft_model(load(compressed_dir), lora_config())
    losses = train_steps(model, input_ids, steps=5)
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        expected = model(input_ids).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4
    torch.save(input_ids, tmp_path / "ids.pt")
    code = f"""
import torch, optimum_lrs
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained({str(compressed_dir)!r})
model = optimum_lrs.load_adapter(base, {str(tmp_path / 'adapter')!r}).eval()
with torch.no_grad():
    torch.save(model(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.allclose(torch.load(tmp_path / "out.pt"), expected, atol=1e-5)


def test_merge_keeps_layers_compressed_and_unmerge_is_exact(compressed_dir, input_ids, tmp_path):
    model = get_peft_model(load(compressed_dir), lora_config())
    train_steps(model, input_ids)
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids).logits
        base_out = model.get_base_model()
        with model.disable_adapter():
            plain = model(input_ids).logits
    before = factors(model)
    ranks = {n: m.get_base_layer().rank for n, m in model.named_modules() if isinstance(m, LowRankSparseLoraLinear)}
    model.merge_adapter()
    with torch.no_grad():
        assert torch.allclose(model(input_ids).logits, adapted, atol=1e-5)
    merged_ranks = {n: m.get_base_layer().rank for n, m in model.named_modules() if isinstance(m, LowRankSparseLoraLinear)}
    assert merged_ranks == {n: r + 4 for n, r in ranks.items()}
    model.unmerge_adapter()
    after = factors(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(input_ids).logits, plain)
    assert base_out is model.get_base_model()

    merged = model.merge_and_unload()
    assert not any(isinstance(m, LowRankSparseLoraLinear) for m in merged.modules())
    assert all(isinstance(merged.get_submodule(n.removeprefix("base_model.model.")), LowRankSparseLinear) for n in ranks)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids).logits, adapted, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    recorded = json.loads((tmp_path / "merged" / "config.json").read_text())["quantization_config"]["compressed"]["modules"]
    assert {n: recorded[n.removeprefix("base_model.model.")]["rank"] for n in ranks} == merged_ranks
    reloaded = load(tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids).logits, adapted, atol=1e-5)


def test_gradient_checkpointing(compressed_dir, input_ids):
    model = load(compressed_dir)
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model = get_peft_model(model, lora_config())
    model.train()
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_unsupported_lora_options_fail_clearly(compressed_dir):
    with pytest.raises(ValueError, match="lora_bias"):
        get_peft_model(load(compressed_dir), lora_config(lora_bias=True))
    with pytest.raises(ValueError, match="variant"):
        get_peft_model(load(compressed_dir), lora_config(use_dora=True))


def test_trainer_trains_the_peft_wrapped_model(compressed_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    ids = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row} for row in ids]
    model = get_peft_model(load(compressed_dir), lora_config())
    before = factors(model)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 6
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    after = factors(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: training moved it


def test_plain_lora_config_gets_peft_error_naming_the_layer(compressed_dir):
    """PEFT's classes are untouched by the import: a plain LoraConfig does not know compressed layers."""
    with pytest.raises(ValueError, match="LowRankSparseLinear|not supported"):
        get_peft_model(load(compressed_dir), LoraConfig(r=2, target_modules=["q_proj"]))
