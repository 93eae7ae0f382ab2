"""Compressed models and their LoRA adapters through a real Hub round trip (local HubServer, real clients)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from optimum_lrs import LowRankSparseConfig

from .hub_server import HubServer, run_client

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    with HubServer() as server:
        yield server


@pytest.fixture(scope="module")
def compressed(dense_with_tokenizer, tmp_path_factory) -> Path:
    cfg = LowRankSparseConfig(param_ratio=0.5)
    model = AutoModelForCausalLM.from_pretrained(dense_with_tokenizer, quantization_config=cfg)
    model.config.quantization_config.compressed.evaluation = {"perplexity": 12.5, "dataset": "x"}  # as `eval --record`
    out = tmp_path_factory.mktemp("hub-compressed")
    model.save_pretrained(out)
    return out


def test_push_to_hub_writes_card_and_reloads_identically(hub, compressed, tmp_path, input_ids):
    torch.save(input_ids, tmp_path / "ids.pt")
    run_client(hub, tmp_path / "home1", f"""
        import optimum_lrs
        from transformers import AutoModelForCausalLM
        optimum_lrs.push_to_hub(AutoModelForCausalLM.from_pretrained({str(compressed)!r}), "user/tiny-lrs",
                                base_model={BASE!r})
    """)
    files = hub.files("user/tiny-lrs")
    assert {"config.json", "model.safetensors", "README.md", "allocation.png"} <= set(files)
    assert files["allocation.png"].startswith(b"\x89PNG")
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == BASE and card.data.base_model_relation == "quantized"
    assert card.data.library_name == "transformers"
    assert {"optimum-lrs", "low-rank", "sparse", "allocation-uniform"} <= set(card.data.tags)
    assert "pip install optimum-lrs" in card.text and "import optimum_lrs" in card.text
    assert "12.5" in card.text and "| param_ratio=0.5 | uniform |" in card.text and "allocation.png" in card.text
    assert "positions are kept as a bitmask" in card.text  # the default layout, named as stored
    assert "Block output matching lowered the output error of 2 of 2 decoder blocks" in card.text  # on by default
    pushed = json.loads(files["config.json"])
    assert pushed["model_type"] == "optimum_lrs" and pushed["quantization_config"]["compressed"]["base_model"] == BASE

    run_client(hub, tmp_path / "home2", f"""
        import torch, optimum_lrs
        model = optimum_lrs.LRSModelForCausalLM.from_pretrained("user/tiny-lrs")
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})
    """)
    local = AutoModelForCausalLM.from_pretrained(compressed)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "out.pt"), local(input_ids).logits)
    assert hub.unhandled == []


def test_lora_adapter_of_compressed_model_round_trips(hub, compressed, tmp_path, input_ids):
    torch.save(input_ids, tmp_path / "ids.pt")
    run_client(hub, tmp_path / "home1", f"""
        import torch, optimum_lrs
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained({str(compressed)!r}),
                               optimum_lrs.LowRankSparseLoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False))
        model.push_to_hub("user/tiny-lrs-lora")
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'pushed.pt')!r})
    """)
    assert "adapter_config.json" in hub.files("user/tiny-lrs-lora")
    run_client(hub, tmp_path / "home2", f"""
        import torch, optimum_lrs
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(compressed)!r})
        model = optimum_lrs.load_adapter(base, "user/tiny-lrs-lora")
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'pulled.pt')!r})
    """)
    pushed, pulled = torch.load(tmp_path / "pushed.pt"), torch.load(tmp_path / "pulled.pt")
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(compressed)(input_ids).logits
    assert torch.equal(pushed, pulled) and not torch.allclose(pushed, plain)  # the adapter is non-trivial
    assert hub.unhandled == []
