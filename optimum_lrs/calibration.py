"""Calibration tokens: fixed-length windows drawn with a seed from whatever the user supplied.

Accepted inputs (`LowRankSparseConfig.calibration_data`): a list of texts, a `datasets.Dataset`
with a `text` column, token-id lists, or a 2-D tensor of token ids (used as given, one row a
sample). Texts and id lists are joined into one token stream, from which `num_samples` windows of
`seq_len` tokens start at seeded random offsets. With no data, a C4 sample shipped with the
package (data/README.md) is used.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import torch


def default_texts() -> list[str]:
    """The C4 sample shipped with the package (ODC-BY; see optimum_lrs/data/README.md)."""
    lines = resources.files("optimum_lrs").joinpath("data/c4_sample.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def _texts_of(data: Any) -> list[str] | None:
    if isinstance(data, list) and all(isinstance(t, str) for t in data):
        return data
    if type(data).__module__.startswith("datasets"):
        if "text" not in data.column_names:
            raise ValueError(f"calibration_data: the dataset has no 'text' column (columns: {data.column_names})")
        return [t for t in data["text"] if t]
    return None


def token_stream(data: Any, tokenizer: Any) -> torch.Tensor:
    """All calibration data as one 1-D tensor of token ids."""
    texts = default_texts() if data is None else _texts_of(data)
    if texts is not None:
        if tokenizer is None:
            raise ValueError("calibration texts need a tokenizer: set LowRankSparseConfig(tokenizer=...)")
        text = "\n\n".join(texts)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        if ids.numel() == 0 and text.strip():
            size = len(tokenizer) if hasattr(tokenizer, "__len__") else "?"
            raise ValueError(
                f"the tokenizer ({type(tokenizer).__name__}, {size} entries) turns {len(text)} characters of calibration "
                "text into no tokens: it is empty, as transformers builds one for a model directory without tokenizer "
                "files. Pass LowRankSparseConfig(tokenizer=...) or token ids as calibration_data, or "
                "activation_aware=False with allocation='uniform' (no calibration)"
            )
    else:
        ids = torch.tensor([t for seq in data for t in seq], dtype=torch.long)
    return ids.long()


def calibration_windows(
    data: Any, tokenizer: Any, seq_len: int, num_samples: int, seed: int, vocab_size: int | None = None
) -> torch.Tensor:
    """A (num_samples, seq_len) tensor of token ids, the same for the same inputs and seed."""
    if isinstance(data, torch.Tensor):
        windows = data.long()
    else:
        ids = token_stream(data, tokenizer)
        if ids.numel() < seq_len:
            raise ValueError(
                f"calibration data has {ids.numel()} tokens, fewer than one window of calibration_seq_len={seq_len}"
            )
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, ids.numel() - seq_len + 1, (num_samples,), generator=generator)
        windows = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
    if vocab_size is not None and (windows.min() < 0 or windows.max() >= vocab_size):
        raise ValueError(f"calibration token ids must lie in [0, {vocab_size}) for this model")
    return windows
