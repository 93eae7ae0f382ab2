"""Perplexity by the standard protocol of LLM-compression papers.

Concatenate the text, tokenize once, cut non-overlapping windows of `seq_len` tokens (the tail that
does not fill a window is dropped), average the next-token NLL over every predicted token, exponentiate.
"""

from __future__ import annotations

import math

import torch

from .progress import progress


def perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str,
    seq_len: int = 2048,
    max_windows: int | None = None,
    add_bos: bool = False,
) -> float:
    """Perplexity of `model` on `text`; `max_windows` evaluates only the first windows (a fixed slice)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n_windows = ids.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in progress(range(n_windows), desc="perplexity", unit="window"):
            window = ids[i * seq_len : (i + 1) * seq_len]
            if add_bos and tokenizer.bos_token_id is not None:
                window = torch.cat([torch.tensor([tokenizer.bos_token_id]), window[:-1]])
            window = window.unsqueeze(0).to(device)
            logits = model(window).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            count += window.shape[1] - 1
    return math.exp(nll / count)
