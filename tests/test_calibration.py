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


def test_a_datasets_dataset_calibrates_as_its_text_column_does():
    """The documented `datasets.Dataset` input: the windows, and so the compressed model, of its `text` column."""
    datasets = pytest.importorskip("datasets", reason="datasets comes with lm-eval in the test extra")
    from optimum_lrs import LowRankSparseConfig, compress_

    from .conftest import tiny_llama

    texts = default_texts()[:6]
    data = datasets.Dataset.from_dict({"text": texts, "url": [f"doc{i}" for i in range(6)]})
    tok = CharTokenizer()
    assert torch.equal(calibration_windows(data, tok, 32, 5, 0), calibration_windows(texts, tok, 32, 5, 0))
    models = [compress_(tiny_llama(), LowRankSparseConfig(param_ratio=0.5, calibration_data=given, tokenizer=tok,
                                                          calibration={"num_samples": 4, "seq_len": 32}))
              for given in (data, texts)]
    states = [m.state_dict() for m in models]
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    with pytest.raises(ValueError, match=r"no 'text' column \(columns: \['content'\]\)"):
        calibration_windows(datasets.Dataset.from_dict({"content": texts}), tok, 32, 5, 0)
