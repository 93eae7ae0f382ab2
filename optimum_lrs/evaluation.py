"""Perplexity by the standard protocol of LLM-compression papers.

Concatenate the text, tokenize once, cut non-overlapping windows of `seq_len` tokens (the tail that
does not fill a window is dropped), average the next-token NLL over every predicted token, exponentiate.
Where the tokenizer puts a BOS before any text (Llama, Gemma), each window starts with it, as lm-eval and the
papers do for such models: some lose a third of their quality without it.
"""

from __future__ import annotations

import math

import torch

from .calibration import leading_special_tokens
from .progress import progress


def perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str,
    seq_len: int = 2048,
    max_windows: int | None = None,
    add_bos: bool | None = None,
) -> float:
    """Perplexity of `model` on `text`; `max_windows` evaluates only the first windows (a fixed slice).

    `add_bos`: None (default) starts each window with the tokens the tokenizer puts before a text
    (`calibration.leading_special_tokens`), True with its `bos_token_id`, False with nothing; the prefix takes
    the place of the window's last tokens, so the windows stay where they are.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n_windows = ids.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    if add_bos is None:
        prefix = leading_special_tokens(tokenizer)
    else:
        prefix = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    if len(prefix) >= seq_len:
        raise ValueError(f"seq_len={seq_len} leaves no room after the tokenizer's {len(prefix)} leading special tokens")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in progress(range(n_windows), desc="perplexity", unit="window"):
            window = ids[i * seq_len : (i + 1) * seq_len]
            if prefix:
                window = torch.cat([torch.tensor(prefix, dtype=window.dtype), window[: seq_len - len(prefix)]])
            window = window.unsqueeze(0).to(device)
            logits = model(window).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            count += window.shape[1] - 1
    return math.exp(nll / count)


def lm_eval_tasks(model: torch.nn.Module, tokenizer, tasks: list[str], batch_size: int = 1, **kwargs) -> dict:
    """Run lm-evaluation-harness tasks on a (compressed) model already in memory; returns its results dict.

    Needs `pip install lm-eval` (not a dependency of optimum-lrs). The harness wraps the model as it is,
    so the compressed layers run exactly as after `from_pretrained`; `kwargs` go to `simple_evaluate`
    (e.g. `limit=`, `num_fewshot=`).
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise ImportError("lm_eval_tasks needs lm-evaluation-harness: pip install lm-eval") from exc
    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return simple_evaluate(model=harness_model, tasks=list(tasks), **kwargs)
