"""Building and loading the CPU kernels' shared library: `csrc/` compiled with the system C compiler on first
use and cached per source, compiler flags and CPU (`-march=native`) under `$OPTIMUM_LRS_CACHE` (default
`~/.cache/optimum_lrs`). Without a working compiler, or with `OPTIMUM_LRS_NO_KERNELS=1`, `bitmask_library()` is
None and the layers take their torch paths (`kernels.py` holds the products that call into the library)."""

from __future__ import annotations

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
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "bitmask_matmul.c"
# Included by SOURCE: part of the cache key.
HEADERS = tuple(SOURCE.with_name(name) for name in ("bitmask_typed.h", "quantized_typed.h", "bf16_codes.h",
                                                     "quantized_bf16.h", "quantized_avx2.h"))
# The factor dtypes the kernels read as stored (widened to float32 in registers), by entry point suffix.
FACTOR_SUFFIXES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
DISABLE_ENV = "OPTIMUM_LRS_NO_KERNELS"
# Tried in order: the first that compiles is used (no OpenMP means one thread; no -march=native means no AVX2).
FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3", "-march=native"],
    ["-O3"],
)
_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
             ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]


def compiler() -> list[str] | None:
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


def _build(command: list[str]) -> Path:
    """Compile the source into the cache (atomically, so that concurrent processes may race) and return it."""
    source = b"\0".join(path.read_bytes() for path in (SOURCE, *HEADERS))
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, " ".join(command + flags).encode(), _cpu_signature().encode()]))
        target = _cache_dir() / f"bitmask_matmul-{key.hexdigest()[:16]}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        proc = subprocess.run([*command, *flags, "-shared", "-fPIC", str(SOURCE), "-o", tmp],
                              capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            os.replace(tmp, target)
            logger.info("optimum_lrs: built %s with %s", target, " ".join(command + flags))
            return target
        os.unlink(tmp)
        errors.append(f"{' '.join(flags)}: {proc.stderr.strip()[-500:]}")
    raise OSError("could not compile " + str(SOURCE) + ":\n" + "\n".join(errors))


@functools.lru_cache(maxsize=None)
def bitmask_library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (logged once) when they are disabled or cannot be built here."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    command = compiler()
    if command is None:
        logger.warning("optimum_lrs: no C compiler found; bitmask layers use the slower torch path")
        return None
    try:
        library = ctypes.CDLL(str(_build(command)))
    except OSError as exc:
        logger.warning("optimum_lrs: bitmask kernels unavailable, using the slower torch path (%s)", exc)
        return None
    work = [ctypes.c_void_p, ctypes.c_int64]
    library.lrs_workspace_floats.argtypes = [ctypes.c_int64] * 3
    library.lrs_workspace_floats.restype = ctypes.c_int64
    library.lrs_quantized_workspace_floats.argtypes = [ctypes.c_int64] * 4
    library.lrs_quantized_workspace_floats.restype = ctypes.c_int64
    library.lrs_few_workspace_floats.argtypes = [ctypes.c_int64] * 4
    library.lrs_few_workspace_floats.restype = ctypes.c_int64
    library.lrs_quantized_few_workspace_floats.argtypes = [ctypes.c_int64] * 5
    library.lrs_quantized_few_workspace_floats.restype = ctypes.c_int64
    library.lrs_bf16_pairs.argtypes, library.lrs_bf16_pairs.restype = [], ctypes.c_int
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    argtypes = {
        "lrs_bitmask_matmul": [*_ARGTYPES[:-1], *work, ctypes.c_int],
        "lrs_bitmask_matmul_t": _ARGTYPES,
        "lrs_bitmask_to_dense": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                 ctypes.c_int64, ctypes.c_void_p, ctypes.c_int],
        "lrs_lowrank_bitmask_few": [p, i64, i64, p, p, i64, p, p, i64, i64, p, i64, p, c_int, *work, c_int],
        "lrs_lowrank_bitmask_matmul": [*_ARGTYPES[:3], ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                       ctypes.c_void_p, *_ARGTYPES[3:-1], *work, ctypes.c_int],
        "lrs_quantized_few": [p, i64, i64, p, p, p, p, i64, p, p, i64, i64, p, p, i64, c_int, i64, p, c_int, *work,
                              c_int],
        "lrs_dequantize": [p, p, c_int, i64, i64, p, c_int],
        "lrs_quantized_to_dense": [p, i64, i64, i64, p, p, i64, c_int, i64, p, c_int, p, i64, c_int],
    }
    for name, types in argtypes.items():
        for suffix in FACTOR_SUFFIXES.values():
            function = getattr(library, f"{name}_{suffix}")
            function.argtypes, function.restype = types, ctypes.c_int
    return library
