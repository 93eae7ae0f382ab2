"""`LRSQuantizer` follows optimum's OptimumQuantizer: from_pretrained(...).quantize(save_dir=...)."""

import pytest
import torch
from optimum.quantization_base import OptimumQuantizer
from transformers import AutoModelForCausalLM

from optimum_lrs import LowRankSparseConfig, LowRankSparseLinear, LRSQuantizer


def test_quantize_saves_a_reloadable_compressed_model(dense_with_tokenizer, tmp_path, input_ids):
    quantizer = LRSQuantizer.from_pretrained(dense_with_tokenizer)
    assert isinstance(quantizer, OptimumQuantizer) and quantizer.tokenizer is not None
    config = LowRankSparseConfig(param_ratio=0.4)
    model = quantizer.quantize(save_dir=tmp_path / "out", compression_config=config)
    assert config.compressed is None  # the caller's config is not consumed
    assert sum(isinstance(m, LowRankSparseLinear) for m in model.modules()) == 14
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, model(input_ids).logits)
    assert (tmp_path / "out" / "README.md").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()


def test_quantize_refuses_before_doing_work(dense_with_tokenizer, tmp_path):
    quantizer = LRSQuantizer.from_pretrained(dense_with_tokenizer)
    with pytest.raises(ValueError, match="file_prefix"):
        quantizer.quantize(save_dir=tmp_path / "a", file_prefix="model")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        quantizer.quantize(save_dir=busy, compression_config={"param_ratio": 0.5})
    assert (busy / "mine.txt").read_text() == "keep"
    assert not any(isinstance(m, LowRankSparseLinear) for m in quantizer.model.modules())  # nothing was compressed
    with pytest.raises(TypeError, match="PreTrainedModel"):
        LRSQuantizer(torch.nn.Linear(2, 2))
