"""CPU kernels for the bitmask sparse layout, compiled from `csrc/` with the system C compiler on first use.

torch has no kernel for a bitmask-coded sparse matrix, and its CSR kernels lose to dense matmul at the
~40% density of S at 50% (docs/performance.md). The C source is small and builds in about a second; the
shared library is cached per source, compiler flags and CPU (`-march=native`) under
`$OPTIMUM_LRS_CACHE` (default `~/.cache/optimum_lrs`). Without a working compiler, or with
`OPTIMUM_LRS_NO_KERNELS=1`, `bitmask_library()` is None and the layers use their torch path: same results,
slower (decoding most: ~10x per layer). `tests/test_kernels.py` checks every path against the dense product.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "bitmask_matmul.c"
DISABLE_ENV = "OPTIMUM_LRS_NO_KERNELS"
# Tried in order: the first that compiles is used (no OpenMP means one thread; no -march=native means no AVX2).
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3", "-march=native"],
    ["-O3"],
)
_disabled = False
_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
             ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]


def _compiler() -> list[str] | None:
    configured = os.environ.get("CC") or sysconfig.get_config_var("CC") or ""
    for candidate in (shlex.split(configured), ["cc"], ["gcc"], ["clang"]):
        if candidate and shutil.which(candidate[0]):
            return candidate
    return None


def _cpu_signature() -> str:
    """What `-march=native` depends on: the CPU's feature flags (Linux) or the processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _cache_dir() -> Path:
    return Path(os.environ.get("OPTIMUM_LRS_CACHE") or Path.home() / ".cache" / "optimum_lrs") / "kernels"


def _build(compiler: list[str]) -> Path:
    """Compile the source into the cache (atomically, so that concurrent processes may race) and return it."""
    source = SOURCE.read_bytes()
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, " ".join(compiler + flags).encode(), _cpu_signature().encode()]))
        target = _cache_dir() / f"bitmask_matmul-{key.hexdigest()[:16]}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        proc = subprocess.run([*compiler, *flags, "-shared", "-fPIC", str(SOURCE), "-o", tmp],
                              capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            os.replace(tmp, target)
            logger.info("optimum_lrs: built %s with %s", target, " ".join(compiler + flags))
            return target
        os.unlink(tmp)
        errors.append(f"{' '.join(flags)}: {proc.stderr.strip()[-500:]}")
    raise OSError("could not compile " + str(SOURCE) + ":\n" + "\n".join(errors))


@functools.lru_cache(maxsize=None)
def bitmask_library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (logged once) when they are disabled or cannot be built here."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    compiler = _compiler()
    if compiler is None:
        logger.warning("optimum_lrs: no C compiler found; bitmask layers use the slower torch path")
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except OSError as exc:
        logger.warning("optimum_lrs: bitmask kernels unavailable, using the slower torch path (%s)", exc)
        return None
    work = [ctypes.c_void_p, ctypes.c_int64]
    library.lrs_bitmask_matmul.argtypes = [*_ARGTYPES[:-1], *work, ctypes.c_int]
    library.lrs_bitmask_matmul_t.argtypes = _ARGTYPES
    library.lrs_workspace_floats.argtypes = [ctypes.c_int64] * 3
    library.lrs_workspace_floats.restype = ctypes.c_int64
    library.lrs_bitmask_to_dense.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                             ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    library.lrs_bitmask_to_dense.restype = ctypes.c_int
    library.lrs_lowrank_bitmask_few.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
        ctypes.c_void_p, *_ARGTYPES[3:]]
    library.lrs_lowrank_bitmask_few.restype = ctypes.c_int
    library.lrs_lowrank_bitmask_matmul.argtypes = [*_ARGTYPES[:3], ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                                   ctypes.c_void_p, *_ARGTYPES[3:-1], *work, ctypes.c_int]
    for name in ("lrs_bitmask_matmul", "lrs_bitmask_matmul_t", "lrs_lowrank_bitmask_matmul"):
        getattr(library, name).restype = ctypes.c_int
    return library


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Layers take their torch paths inside this block even where the kernels are built: tests and benchmarks
    compare the two."""
    global _disabled
    before, _disabled = _disabled, True
    try:
        yield
    finally:
        _disabled = before


def can_run(*tensors: torch.Tensor) -> bool:
    """Whether the kernels apply: CPU tensors, a library built for this machine, not inside `disabled()`."""
    return not _disabled and all(t.device.type == "cpu" for t in tensors) and bitmask_library() is not None


def bitmask_addmm_(out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """out (T, m) += x (T, n) S^T for S given as `mask` (m, ceil(n / 8)) uint8 and row-major float32 `values`."""
    return _call("lrs_bitmask_matmul", out, x, mask, values, rows=out.shape[1], cols=x.shape[1], rank=0)


def lowrank_bitmask_matmul(x: torch.Tensor, lowrank_u: torch.Tensor, lowrank_v: torch.Tensor, bias: torch.Tensor | None,
                           mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """x (U V + S)^T + bias (float32) in one call, for any number of rows of x (from 9 on it beats the per-byte
    path): per token tile, z = x V^T, then each output's sum starts from U's row times z and adds S's set
    positions; no (T, m) intermediate, no zero fill, and no separate skinny GEMM for z."""
    m, n = lowrank_u.shape[0], x.shape[1]
    if lowrank_v.shape != (lowrank_u.shape[1], n) or (bias is not None and bias.shape != (m,)):
        raise ValueError(f"lowrank_bitmask_matmul: shapes x {tuple(x.shape)}, U {tuple(lowrank_u.shape)}, "
                         f"V {tuple(lowrank_v.shape)}, bias {None if bias is None else tuple(bias.shape)} disagree")
    out = torch.empty(x.shape[0], m, dtype=torch.float32)
    extra = () if bias is None else (bias,)
    lowrank_v, lowrank_u, *bias_ = (t.to(torch.float32).contiguous() for t in (lowrank_v, lowrank_u, *extra))
    if any(t.device.type != "cpu" for t in (lowrank_v, lowrank_u, *bias_)):
        raise ValueError("lowrank_bitmask_matmul: the kernels take CPU tensors")
    pointers = (lowrank_v.data_ptr(), lowrank_u.shape[1], lowrank_u.data_ptr(), bias_[0].data_ptr() if bias_ else None)
    return _call("lrs_lowrank_bitmask_matmul", out, x, mask, values, rows=m, cols=n, before_mask=pointers,
                 rank=lowrank_u.shape[1])


def bitmask_addmm_t_(out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """out (T, n) += x (T, m) S: the product with S^T, i.e. the gradient of `bitmask_addmm_` for its input."""
    return _call("lrs_bitmask_matmul_t", out, x, mask, values, rows=x.shape[1], cols=out.shape[1])


def few_tokens() -> int:
    """Up to how many input rows `lowrank_bitmask_few` runs here (0 without the kernels or without AVX2)."""
    return 0 if _disabled else _library_few_tokens()


@functools.lru_cache(maxsize=None)
def _library_few_tokens() -> int:
    library = bitmask_library()
    return library.lrs_few_tokens() if library is not None else 0


def lowrank_bitmask_few(x: torch.Tensor, lowrank_u: torch.Tensor, lowrank_v: torch.Tensor, bias: torch.Tensor | None,
                        mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """x (U V + S)^T + bias (float32) for at most `few_tokens()` rows of x, in a single call: decoding runs every
    layer once per token, where the separate low-rank products and their dispatch cost as much as S's."""
    m, n = lowrank_u.shape[0], x.shape[1]
    if mask.shape != (m, -(-n // 8)) or lowrank_v.shape != (lowrank_u.shape[1], n):
        raise ValueError(f"lowrank_bitmask_few: shapes x {tuple(x.shape)}, U {tuple(lowrank_u.shape)}, "
                         f"V {tuple(lowrank_v.shape)}, mask {tuple(mask.shape)} disagree")
    if not 1 <= x.shape[0] <= few_tokens():
        raise ValueError(f"lowrank_bitmask_few: {x.shape[0]} rows, outside the 1..{few_tokens()} it takes")
    extra = () if bias is None else (bias,)
    mask, x, lowrank_u, lowrank_v, values, *bias_ = _prepared("lowrank_bitmask_few", mask, x, lowrank_u, lowrank_v,
                                                              values, *extra)
    out = torch.empty(x.shape[0], m, dtype=torch.float32)
    status = bitmask_library().lrs_lowrank_bitmask_few(
        x.data_ptr(), x.shape[0], n, lowrank_u.data_ptr(), lowrank_v.data_ptr(), lowrank_u.shape[1],
        bias_[0].data_ptr() if bias_ else None, mask.data_ptr(), m, mask.shape[1], values.data_ptr(), values.numel(),
        out.data_ptr(), torch.get_num_threads())
    _check(status, "lowrank_bitmask_few", values.numel(), x.shape[0])
    return out


def bitmask_to_dense(mask: torch.Tensor, values: torch.Tensor, cols: int) -> torch.Tensor:
    """S as a dense float32 (rows, cols) tensor, from `mask` (rows, ceil(cols / 8)) and row-major `values`."""
    if mask.shape[1] != -(-cols // 8):
        raise ValueError(f"bitmask_to_dense: mask {tuple(mask.shape)} does not cover {cols} columns")
    mask, values = _prepared("bitmask_to_dense", mask, values)
    dense = torch.empty(mask.shape[0], cols, dtype=torch.float32)
    status = bitmask_library().lrs_bitmask_to_dense(mask.data_ptr(), mask.shape[0], cols, mask.shape[1],
                                                    values.data_ptr(), values.numel(), dense.data_ptr(),
                                                    torch.get_num_threads())
    _check(status, "bitmask_to_dense", values.numel(), mask.shape[0])
    return dense


def _prepared(name: str, mask: torch.Tensor, *floats: torch.Tensor) -> list[torch.Tensor]:
    """The mask and the float tensors as the C code reads them: contiguous CPU arrays, uint8 and float32 (the
    caller keeps the returned tensors alive for the call, as their pointers are all the C code gets)."""
    if mask.dtype != torch.uint8:
        raise ValueError(f"{name}: the bitmask must be uint8, got {mask.dtype}")
    tensors = [mask.contiguous(), *(t.to(torch.float32).contiguous() for t in floats)]
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError(f"{name}: the kernels take CPU tensors")
    return tensors


_thread_state = threading.local()


def _workspace(floats: int) -> tuple[int, int]:
    """(pointer, size) of this thread's float32 work buffer, at least `floats` long: kept between calls, as
    freshly allocated memory costs a page fault per 4 KiB on first touch (20% of a 512-token product measured,
    docs/performance.md). It grows to the largest input seen (tokens x (in_features + rank) floats) and goes
    with the thread."""
    buffer = getattr(_thread_state, "workspace", None)
    if buffer is None or buffer.numel() < floats:
        buffer = _thread_state.workspace = torch.empty(max(floats, 1), dtype=torch.float32)
    return buffer.data_ptr(), buffer.numel()


def _check(status: int, name: str, nvalues: int, rows: int) -> None:
    if status == -2:
        raise ValueError(f"{name}: the bitmask's set bits do not number the {nvalues} values")
    if status == -3:
        raise ValueError(f"{name}: {rows} rows, more than this build takes ({few_tokens()})")
    if status != 0:
        raise MemoryError(f"{name}: could not allocate its work buffers ({rows} rows)")


def _call(name: str, out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, values: torch.Tensor,
          rows: int, cols: int, before_mask: tuple = (), rank: int | None = None) -> torch.Tensor:
    """Checks and calls one product: S is (rows, cols), x (T, x.shape[1]), out (T, out.shape[1]) the output;
    `before_mask`: the arguments an entry point takes between x's and the mask's (pointers the caller keeps alive);
    `rank` for the entry points that take this thread's work buffer (sized for that low-rank width)."""
    if out.dtype != torch.float32 or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(f"{name}: out must be a contiguous float32 CPU tensor, got {out.dtype} on {out.device}")
    if mask.shape != (rows, -(-cols // 8)) or out.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: shapes out {tuple(out.shape)}, x {tuple(x.shape)}, mask {tuple(mask.shape)} disagree")
    mask, x, values = _prepared(name, mask, x, values)
    if x.shape[0] == 0:
        return out
    library = bitmask_library()
    work = () if rank is None else _workspace(library.lrs_workspace_floats(x.shape[0], x.shape[1], rank))
    status = getattr(library, name)(
        x.data_ptr(), x.shape[0], x.shape[1], *before_mask, mask.data_ptr(), out.shape[1], mask.shape[1], values.data_ptr(),
        values.numel(), out.data_ptr(), *work, torch.get_num_threads())
    _check(status, name, values.numel(), x.shape[0])
    return out
