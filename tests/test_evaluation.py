import math

import pytest
import torch

from optimum_lrs.evaluation import perplexity

from .conftest import ByteTokenizer, tiny_llama

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 4


def test_perplexity_matches_a_direct_computation():
    model, tok = tiny_llama(), ByteTokenizer()
    ids = tok(TEXT).input_ids[0]
    seq_len, windows = 64, ids.numel() // 64
    nll = []
    with torch.no_grad():
        for w in range(windows):
            chunk = ids[w * seq_len : (w + 1) * seq_len]
            logp = torch.log_softmax(model(chunk[None]).logits[0], -1)
            nll += [-logp[t, chunk[t + 1]].item() for t in range(seq_len - 1)]
    assert perplexity(model, tok, TEXT, seq_len) == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    first = math.exp(sum(nll[: seq_len - 1]) / (seq_len - 1))
    assert perplexity(model, tok, TEXT, seq_len, max_windows=1) == pytest.approx(first, rel=1e-5)


def test_perplexity_errors():
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(tiny_llama(), ByteTokenizer(), "short", 64)
    with pytest.raises(ValueError, match="seq_len"):
        perplexity(tiny_llama(), ByteTokenizer(), TEXT, 1)
