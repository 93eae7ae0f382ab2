"""On-disk cache of Stage 1 results, one safetensors file per matrix.

RPCA is the expensive part of compression. Keying each result by the matrix's content and the RPCA
settings lets an interrupted run resume where it stopped and lets several budgets share one Stage 1.
Files are written to a temporary name and renamed, so a killed run never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .rpca import RPCAResult

logger = logging.getLogger(__name__)

# Bump when the RPCA algorithm changes in a way that changes its results.
_RPCA_VERSION = 2


def cache_key(matrix: torch.Tensor, settings: list) -> str:
    """SHA-256 of the matrix's shape, dtype and bytes and of the RPCA settings."""
    digest = hashlib.sha256()
    digest.update(json.dumps([list(matrix.shape), str(matrix.dtype), settings, _RPCA_VERSION]).encode())
    digest.update(matrix.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load(cache_dir: str, key: str, device: torch.device | str = "cpu") -> RPCAResult | None:
    """The cached result, or None when absent or unreadable (an unreadable entry is logged and ignored)."""
    path = Path(cache_dir) / f"{key}.safetensors"
    if not path.exists():
        return None
    try:
        t = load_file(path, device=str(device))
        with open(path, "rb") as f:  # metadata lives in the header
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
        return RPCAResult(t["u"], t["s"], t["vh"], t["sparse"], int(header["iterations"]),
                          float(header["residual"]), header["converged"] == "true")
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        logger.warning("ignoring unreadable Stage 1 cache entry %s (%s); recomputing", path, exc)
        return None


def store(cache_dir: str, key: str, result: RPCAResult) -> None:
    path = Path(cache_dir) / f"{key}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tensors = {"u": result.u, "s": result.s, "vh": result.vh, "sparse": result.sparse}
    meta = {"iterations": str(result.iterations), "residual": repr(result.residual),
            "converged": "true" if result.converged else "false"}
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
    os.replace(tmp, path)
