"""Calibration tokens: fixed-length windows drawn with a seed from whatever the user supplied.

Accepted inputs (`LowRankSparseConfig.calibration_data`): a list of texts, a `datasets.Dataset`
with a `text` column, token-id lists, or a 2-D tensor of token ids (used as given, one row a
sample). Texts and id lists are joined into one token stream, from which `num_samples` windows of
`seq_len` tokens start at seeded random offsets; each window from text begins with the tokens the
tokenizer puts before any text (`leading_special_tokens`: a BOS for Llama or Gemma tokenizers, nothing for
GPT-2, Qwen2 or SmolLM2), since the model saw them at the start of every training sequence. With no data, a
C4 sample shipped with the package (data/README.md) is used.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from typing import Any

import torch
from transformers import AutoTokenizer

logger = logging.getLogger(__name__)


def find_tokenizer(source: Any, **kwargs: Any) -> Any:
    """The tokenizer saved with `source` (a directory or Hub id; `gguf_file=` for one inside a GGUF file), or None
    where none loads (logged with the reason): the caller says what that means for its run."""
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as exc:  # transformers raises OSError, ValueError, TypeError... depending on what is missing
        logger.info("no tokenizer loads from %s: %s", source, exc)
        return None


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


def leading_special_tokens(tokenizer: Any) -> list[int]:
    """The ids `tokenizer` puts before a text when asked for special tokens (its BOS, where it adds one), found
    by encoding a probe with and without them; [] for a tokenizer that adds none or cannot say."""
    def encode(special: bool) -> list[int]:
        return torch.as_tensor(tokenizer("a", add_special_tokens=special).input_ids).flatten().tolist()

    try:
        with_special, plain = encode(True), encode(False)
    except Exception:  # a tokenizer-like callable without the keyword: it adds nothing we can see
        return []
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return [int(t) for t in with_special[:start]]
    return []


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
    """A (num_samples, seq_len) tensor of token ids, the same for the same inputs and seed. Windows cut from text
    begin with the tokenizer's `leading_special_tokens`; token ids (lists or a tensor) are used as given."""
    if isinstance(data, torch.Tensor):
        windows = data.long()
    else:
        ids = token_stream(data, tokenizer)
        from_text = data is None or _texts_of(data) is not None
        prefix = leading_special_tokens(tokenizer) if from_text else []
        if len(prefix) >= seq_len:
            raise ValueError(f"CalibrationConfig.seq_len={seq_len} leaves no room after the tokenizer's {len(prefix)} leading special tokens")
        span = seq_len - len(prefix)
        if ids.numel() < span:
            raise ValueError(
                f"calibration data has {ids.numel()} tokens, fewer than one window of CalibrationConfig.seq_len={seq_len}"
            )
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, ids.numel() - span + 1, (num_samples,), generator=generator)
        head = torch.tensor(prefix, dtype=torch.long)
        windows = torch.stack([torch.cat([head, ids[s : s + span]]) for s in starts.tolist()])
    if vocab_size is not None and (windows.min() < 0 or windows.max() >= vocab_size):
        raise ValueError(f"calibration token ids must lie in [0, {vocab_size}) for this model")
    return windows
