"""Models whose tokenizer puts a BOS before every text: calibration windows and perplexity windows start with it."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_lrs import CalibrationConfig, compress_, LowRankSparseConfig, RefitConfig
from optimum_lrs.calibration import calibration_windows, default_texts, leading_special_tokens
from optimum_lrs.evaluation import perplexity

from .conftest import ByteTokenizer, tiny_gemma, train_tokenizer

TEXT = " ".join(default_texts()[:40])


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    plain, bos = tmp_path_factory.mktemp("tok-plain"), tmp_path_factory.mktemp("tok-bos")
    train_tokenizer(plain)
    train_tokenizer(bos, bos=True)
    return AutoTokenizer.from_pretrained(plain), AutoTokenizer.from_pretrained(bos)


def test_the_leading_special_tokens_are_what_the_tokenizer_adds(tokenizers):
    plain, bos = tokenizers
    assert leading_special_tokens(plain) == [] and leading_special_tokens(ByteTokenizer()) == []
    assert leading_special_tokens(bos) == [bos.bos_token_id]
    assert bos("a b").input_ids[0] == bos.bos_token_id  # the fixture does what Llama / Gemma tokenizers do


def test_calibration_windows_from_text_start_with_bos_and_ids_are_used_as_given(tokenizers):
    plain, bos = tokenizers
    windows = calibration_windows([TEXT], bos, seq_len=32, num_samples=6, seed=0)
    assert windows.shape == (6, 32) and (windows[:, 0] == bos.bos_token_id).all()
    stream = plain(TEXT, add_special_tokens=False).input_ids
    text = " ".join(map(str, stream))
    assert all(" ".join(map(str, row[1:].tolist())) in text for row in windows)  # then 31 tokens of the text
    without = calibration_windows([TEXT], plain, seq_len=32, num_samples=6, seed=0)
    assert not (without[:, 0] == bos.bos_token_id).any()
    ids = [list(range(5, 60))]
    assert (calibration_windows(ids, bos, 8, 4, 0)[:, 0] != bos.bos_token_id).all()  # token ids: as given
    with pytest.raises(ValueError, match="CalibrationConfig.seq_len=1 leaves no room after the tokenizer's 1 leading"):
        calibration_windows([TEXT], bos, 1, 2, 0)


def test_perplexity_starts_each_window_with_the_tokenizers_bos(tokenizers):
    plain, bos = tokenizers
    model = tiny_gemma()
    auto = perplexity(model, bos, TEXT, 32, 4)
    assert auto == perplexity(model, bos, TEXT, 32, 4, add_bos=True)
    assert auto != perplexity(model, bos, TEXT, 32, 4, add_bos=False)
    assert perplexity(model, plain, TEXT, 32, 4) == perplexity(model, plain, TEXT, 32, 4, add_bos=False)


def test_a_gemma_model_with_a_bos_tokenizer_compresses_saves_and_reloads(tokenizers, tmp_path):
    _, bos = tokenizers
    dense = tiny_gemma()
    model = copy.deepcopy(dense)
    compress_(model, LowRankSparseConfig(param_ratio=0.5, tokenizer=bos, calibration=CalibrationConfig(seq_len=32, num_samples=8), refit=RefitConfig(block_matching_steps=4)))
    model.save_pretrained(tmp_path / "gemma-lrs")
    import optimum_lrs  # noqa: F401  (registers the checkpoint type for the reload)

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "gemma-lrs")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits, atol=1e-5)
        assert not torch.allclose(model(ids).logits, dense(ids).logits, atol=1e-3)
