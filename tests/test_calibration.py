import pytest
import torch

from optimum_lrs.calibration import calibration_windows, default_texts

from .conftest import ByteTokenizer as CharTokenizer


def test_windows_from_texts_are_seeded_and_in_the_stream():
    texts = ["the quick brown fox jumps over the lazy dog " * 5, "pack my box with five dozen liquor jugs " * 5]
    tok = CharTokenizer()
    a = calibration_windows(texts, tok, seq_len=16, num_samples=6, seed=1)
    b = calibration_windows(texts, tok, seq_len=16, num_samples=6, seed=1)
    c = calibration_windows(texts, tok, seq_len=16, num_samples=6, seed=2)
    assert a.shape == (6, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = bytes(tok("\n\n".join(texts)).input_ids[0].tolist())
    assert all(bytes(row.tolist()) in stream for row in a)


def test_token_ids_and_tensor_inputs():
    ids = [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    windows = calibration_windows(ids, None, seq_len=3, num_samples=4, seed=0)
    flat = list(range(1, 10))
    assert all(any(flat[i : i + 3] == row.tolist() for i in range(7)) for row in windows)
    given = torch.arange(12).view(3, 4)
    assert torch.equal(calibration_windows(given, None, 99, 99, 0), given)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_windows(["short"], CharTokenizer(), seq_len=64, num_samples=2, seed=0)
    with pytest.raises(ValueError, match="need a tokenizer"):
        calibration_windows(["text"], None, seq_len=2, num_samples=1, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        calibration_windows([[1, 2, 9]], None, seq_len=2, num_samples=3, seed=0, vocab_size=5)


def test_default_calibration_text_ships_with_the_package():
    texts = default_texts()
    assert len(texts) == 100 and sum(map(len, texts)) > 150_000
    windows = calibration_windows(None, CharTokenizer(), seq_len=128, num_samples=4, seed=0)
    assert windows.shape == (4, 128)
