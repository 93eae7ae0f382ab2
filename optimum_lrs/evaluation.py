"""Perplexity by the standard protocol of LLM-compression papers.

Concatenate the text, tokenize once, cut non-overlapping windows of `seq_len` tokens (the tail that
does not fill a window is dropped), average the next-token NLL over every predicted token, exponentiate.
Where the tokenizer puts a BOS before any text (Llama, Gemma), each window starts with it, as lm-eval and the
papers do for such models: some lose a third of their quality without it.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

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


def zero_shot(model: torch.nn.Module, tokenizer, tasks: list[str], data_dir: str | Path,
              limit: int | None = None, batch_size: int = 1) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy of `model` (dense or compressed, already in memory) by lm-evaluation-harness itself:
    its `HFLM` wrapper and its stock task logic, on the local data under `data_dir` (`zero_shot_tasks`).

    `tasks`: names from `zero_shot_tasks.TASKS` (piqa, winogrande, boolq, lambada_openai); `limit`: the first N
    items of each task. Returns, per task, `acc` and `acc_stderr` (and `acc_norm`, `perplexity` where the task
    has them), and under "mean" the unweighted mean accuracy over the tasks. Needs the `eval` extra
    (`pip install 'optimum-lrs[eval]'`, which the test extra includes).
    """
    from .zero_shot_tasks import check_tasks, write_task_dir

    tasks = check_tasks(list(tasks))
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or an integer >= 1, got {limit!r}")
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ImportError("zero_shot needs lm-evaluation-harness: pip install 'optimum-lrs[eval]'") from exc
    with tempfile.TemporaryDirectory(prefix="optimum-lrs-tasks-") as scratch:
        manager = TaskManager(include_path=str(write_task_dir(tasks, data_dir, scratch)))
        harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = simple_evaluate(model=harness_model, tasks=tasks, task_manager=manager, limit=limit,
                                 num_fewshot=0, log_samples=False)
    results = {}
    for task in tasks:
        metrics = output["results"][task]
        results[task] = {key.split(",")[0]: float(value) for key, value in metrics.items()
                         if key.endswith(",none") and isinstance(value, (int, float))}
    results["mean"] = {"acc": sum(results[t]["acc"] for t in tasks) / len(tasks)}
    return results
