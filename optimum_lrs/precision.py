"""Where the compression's own forwards may compute in bfloat16: block output matching's steps and CAP's loss
forwards, whose results steer a search (Adam's steps, the policy's update) rather than being kept. The weights,
their factors, Adam's state and every statistic Stage 1 fits to stay float32."""

from __future__ import annotations

import contextlib
import functools

import torch


@functools.cache  # asked at every matching step and CAP loss; the answer is the machine's
def search_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where `device` multiplies it natively (CUDA with bf16; CPUs with AVX512-BF16 or AMX, where a
    SmolLM2 block's forward and backward is 2.9x faster than in float32), float32 elsewhere, where bfloat16 would be
    emulated and slower. What it costs in quality: docs/research-notes.md."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    native = device.type == "cpu" and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.bfloat16 if native else torch.float32


def search_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to `search_dtype(device)`, or nothing where that is float32."""
    dtype = search_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off: for building a weight from its float32 parts inside an autocast region."""
    return torch.autocast(device.type, enabled=False)
