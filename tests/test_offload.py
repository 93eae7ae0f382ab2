"""device_map and accelerate's offload for compressed checkpoints: sized at their real bytes, offloaded to disk or
split between memory and disk, with the outputs of the model held whole; compress-on-load over several places is
refused before any weight loads."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.accelerate import compute_module_sizes

from optimum_lrs import LowRankSparseConfig, compress_

from .conftest import tiny_llama


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    windows = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    model = compress_(tiny_llama(), LowRankSparseConfig(param_ratio=0.5, calibration_data=windows))
    path = tmp_path_factory.mktemp("compressed")
    model.save_pretrained(path)
    return path


def test_accelerate_sizes_compressed_layers_at_their_real_bytes(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    sizes, _ = compute_module_sizes(model, model.hf_quantizer)
    held = [*model.parameters(), *model.buffers()]  # the tied head counted once
    stored = sum(t.numel() * t.element_size() for t in held)
    assert sizes[""] == stored  # what device_map="auto" plans with: the factors, indices and bitmask as held
    assert stored < sum(p.numel() * p.element_size() for p in tiny_llama().state_dict().values())


@pytest.mark.parametrize("budget", ["1KB", "200KB"])
def test_offloaded_model_gives_the_outputs_of_the_whole_one(checkpoint, tmp_path, input_ids, budget):
    """1 KB: everything on disk; 200 KB: embeddings in memory, the decoder blocks on disk."""
    whole = AutoModelForCausalLM.from_pretrained(checkpoint)
    offloaded = AutoModelForCausalLM.from_pretrained(checkpoint, device_map="auto", max_memory={"cpu": budget},
                                                     offload_folder=str(tmp_path))
    assert "disk" in offloaded.hf_device_map.values()
    assert any(p.device.type == "meta" for p in offloaded.parameters())  # really offloaded, loaded per forward
    with torch.no_grad():
        torch.testing.assert_close(offloaded(input_ids).logits, whole(input_ids).logits, rtol=0, atol=0)
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(offloaded.generate(input_ids, **settings), whole.generate(input_ids, **settings))


def test_compress_on_load_over_memory_and_disk_is_refused_before_loading(dense_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"compresses on load only a model held on one device.*compress first"):
        AutoModelForCausalLM.from_pretrained(dense_checkpoint, quantization_config=LowRankSparseConfig(param_ratio=0.5),
                                             device_map="auto", max_memory={"cpu": "20KB"},
                                             offload_folder=str(tmp_path / "offload"))
    assert not (tmp_path / "offload").exists() or not any((tmp_path / "offload").iterdir())
