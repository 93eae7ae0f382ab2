"""CPU kernels for the bitmask sparse layout and the quantized factors: the Python side of `csrc/`, built and
loaded by `kernel_library`.

torch has no kernel for a bitmask-coded sparse matrix, and its CSR kernels lose to dense matmul at the
~40% density of S at 50% (docs/performance.md). Where the library cannot be built (no C compiler, or
`OPTIMUM_LRS_NO_KERNELS=1`) the layers use their torch path: same results, slower (decoding most: ~10x per
layer). U, V and S's values are read as stored in float32, bfloat16 or float16 (widened in registers; inputs,
bias and every sum are float32), so that a half-precision model reads half the bytes.
`tests/test_kernels.py` checks every path against the dense product.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import weakref
from collections.abc import Callable, Iterator

import torch

from .kernel_library import FACTOR_SUFFIXES, bitmask_library

logger = logging.getLogger(__name__)

_disabled = False


def _entry(name: str, dtype: torch.dtype):
    """The library's entry point `name` for factors stored in `dtype` (one of FACTOR_SUFFIXES)."""
    return getattr(bitmask_library(), f"{name}_{FACTOR_SUFFIXES[dtype]}")


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
    return not _disabled and all(t.device.type == "cpu" for t in tensors) and _built()


@torch.compiler.assume_constant_result
def _built() -> bool:
    """Whether the library built here: fixed for the process, so torch.compile reads it once while tracing."""
    return bitmask_library() is not None


def takes_factor_dtype(dtype: torch.dtype) -> bool:
    """Whether the kernels read factors of `dtype` (float32, bfloat16, float16); a layer in another dtype takes
    its torch path, which computes in that dtype, and says so once per dtype."""
    if dtype in FACTOR_SUFFIXES:
        return True
    _note_other_dtype(dtype)
    return False


@functools.lru_cache(maxsize=None)
def _note_other_dtype(dtype: torch.dtype) -> None:
    logger.warning("optimum_lrs: the bitmask kernels read float32, bfloat16 and float16 factors; layers in %s use "
                   "the slower torch path", dtype)


def bitmask_addmm_(out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """out (T, m) += x (T, n) S^T for S given as `mask` (m, ceil(n / 8)) uint8 and row-major `values` (float32,
    bfloat16 or float16, read as stored; any other dtype goes through float32). Computed in float32."""
    return _call("lrs_bitmask_matmul", out, x, mask, values, rows=out.shape[1], cols=x.shape[1], rank=0)


def lowrank_bitmask_matmul(x: torch.Tensor, lowrank_u: torch.Tensor, lowrank_v: torch.Tensor, bias: torch.Tensor | None,
                           mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """x (U V + S)^T + bias (float32) in one call, for any number of rows of x (from 9 on it beats the per-byte
    path): per token tile, z = x V^T, then each output's sum starts from U's row times z and adds S's set
    positions; no (T, m) intermediate, no zero fill, and no separate skinny GEMM for z. U, V and the values
    are read as stored (`_factors`)."""
    m, n = lowrank_u.shape[0], x.shape[1]
    if lowrank_v.shape != (lowrank_u.shape[1], n) or (bias is not None and bias.shape != (m,)):
        raise ValueError(f"lowrank_bitmask_matmul: shapes x {tuple(x.shape)}, U {tuple(lowrank_u.shape)}, "
                         f"V {tuple(lowrank_v.shape)}, bias {None if bias is None else tuple(bias.shape)} disagree")
    out = torch.empty(x.shape[0], m, dtype=torch.float32)
    lowrank_v, lowrank_u, values = _factors("lowrank_bitmask_matmul", lowrank_v, lowrank_u, values)
    bias_ = () if bias is None else (_float32("lowrank_bitmask_matmul", bias),)
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


class FewCall:
    """A layer's few-token product (`lrs_lowrank_bitmask_few` or `lrs_quantized_few`) with its weights' arguments
    checked and converted once: calling it with x (..., n) costs the C call and a few torch calls, where a small
    layer's product takes tens of microseconds and the checks and casts around each call took several times that
    (docs/performance.md, "Decoding overhead"). It holds the weights' pointers, not the tensors: whoever keeps it
    must keep them alive and in place (`layer_call` does, by their pointers). x, bias and the output are float32 or,
    `io_dtype`, the factors' dtype, as a half-precision layer holds them (the C code widens and narrows them)."""

    __slots__ = ("name", "entry", "sizing", "weights", "n", "m", "rank", "nvalues", "io_dtype", "limit", "floats")

    def __init__(self, name: str, dtype: torch.dtype, sizing: Callable[[int, int, int, int, int], int], weights: tuple,
                 shape: tuple[int, int, int, int], io_dtype: torch.dtype, limit: float):
        """`weights`: the entry point's arguments from n to those before y; `shape`: n, m, rank and S's values;
        `sizing(tokens, n, rank, m, threads)`: the work buffer's floats; `limit`: the most rows it takes."""
        self.name, self.entry, self.sizing, self.weights = name, _entry(f"lrs_{name}", dtype), sizing, weights
        (self.n, self.m, self.rank, self.nvalues), self.io_dtype, self.limit = shape, io_dtype, limit
        self.floats: dict[tuple[int, int], int] = {}  # the work buffer's size by (tokens, threads)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., n), a contiguous CPU tensor in `io_dtype` with 1 to `limit` rows: x (U V + S)^T + bias in it."""
        tokens = x.numel() // self.n
        if (x.shape[-1] != self.n or x.dtype != self.io_dtype or not 1 <= tokens <= self.limit or not x.is_contiguous()
                or not x.is_cpu):
            raise ValueError(f"{self.name}: x {tuple(x.shape)} {x.dtype} on {x.device}; it takes a contiguous CPU "
                             f"tensor in {self.io_dtype} with 1 to {self.limit} rows of {self.n}")
        out = torch.empty(*x.shape[:-1], self.m, dtype=x.dtype)
        threads = torch.get_num_threads()
        floats = self.floats.get((tokens, threads))
        if floats is None:
            floats = self.floats[tokens, threads] = self.sizing(tokens, self.n, self.rank, self.m, threads)
        work = _workspace(floats)
        status = self.entry(x.data_ptr(), tokens, *self.weights, out.data_ptr(), int(x.dtype != torch.float32),
                            *work, threads)
        _check(status, self.name, self.nvalues, tokens)
        return out


# Each layer's FewCall and the pointers of the tensors it was built from (`layer_call`); weak, so that a layer
# that goes away takes its call along, and a copied layer builds its own.
_layer_calls: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def layer_call(layer: torch.nn.Module, tensors: tuple[torch.Tensor | None, ...],
               build: Callable[[], FewCall | None]) -> FewCall | None:
    """`layer`'s decoding call, kept while `tensors` (all it reads) stay where they were: built anew by `build`
    (None where the tensors are in another form) once a tensor has moved, as a cast, a move between devices,
    loading into new tensors or an offload hook put it elsewhere. None inside `disabled()` or without the
    library."""
    if _disabled or not _built():
        return None
    key = [0 if t is None else t.data_ptr() for t in tensors]
    cached = _layer_calls.get(layer)
    if cached is None or cached[0] != key:
        cached = _layer_calls[layer] = (key, build())
    return cached[1]


def _stored(*tensors: torch.Tensor | None) -> bool:
    """Whether the tensors are as the kernels read them without a copy: contiguous CPU tensors."""
    return all(t is None or (t.is_cpu and t.is_contiguous()) for t in tensors)


def lowrank_few_call(lowrank_u: torch.Tensor, lowrank_v: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor,
                     values: torch.Tensor, io_dtype: torch.dtype) -> FewCall | None:
    """The `FewCall` of a float bitmask layer, or None where its tensors are not as the kernel reads them (other
    devices, strides, dtypes: U, V and the values in one dtype of FACTOR_SUFFIXES, bias in `io_dtype`, which is
    float32 or theirs)."""
    m, n = lowrank_u.shape[0], lowrank_v.shape[1]
    if mask.shape != (m, -(-n // 8)) or lowrank_v.shape[0] != lowrank_u.shape[1]:
        raise ValueError(f"lowrank_bitmask_few: shapes U {tuple(lowrank_u.shape)}, V {tuple(lowrank_v.shape)}, "
                         f"mask {tuple(mask.shape)} disagree")
    dtype, rank = values.dtype, lowrank_u.shape[1]
    if (not few_tokens() or mask.dtype != torch.uint8 or dtype not in FACTOR_SUFFIXES
            or io_dtype not in (torch.float32, dtype) or lowrank_u.dtype != dtype or lowrank_v.dtype != dtype
            or (bias is not None and bias.dtype != io_dtype) or not _stored(lowrank_u, lowrank_v, bias, mask, values)):
        return None
    weights = (n, lowrank_u.data_ptr(), lowrank_v.data_ptr(), rank, None if bias is None else bias.data_ptr(),
               mask.data_ptr(), m, mask.shape[1], values.data_ptr(), values.numel())
    return FewCall("lowrank_bitmask_few", dtype, _few_workspace_floats, weights, (n, m, rank, values.numel()), io_dtype,
                   few_tokens())


def _few_workspace_floats(tokens: int, n: int, rank: int, m: int, threads: int) -> int:
    return bitmask_library().lrs_few_workspace_floats(tokens, n, rank, m)


def lowrank_bitmask_few(x: torch.Tensor, lowrank_u: torch.Tensor, lowrank_v: torch.Tensor, bias: torch.Tensor | None,
                        mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """x (U V + S)^T + bias (float32) for at most `few_tokens()` rows of x, in a single call: decoding runs every
    layer once per token, where the separate low-rank products and their dispatch cost as much as S's."""
    if mask.shape[0] != lowrank_u.shape[0] or lowrank_v.shape[1] != x.shape[1]:
        raise ValueError(f"lowrank_bitmask_few: shapes x {tuple(x.shape)}, U {tuple(lowrank_u.shape)}, "
                         f"V {tuple(lowrank_v.shape)}, mask {tuple(mask.shape)} disagree")
    if not 1 <= x.shape[0] <= few_tokens():
        raise ValueError(f"lowrank_bitmask_few: {x.shape[0]} rows, outside the 1..{few_tokens()} it takes")
    mask, x = _mask("lowrank_bitmask_few", mask), _float32("lowrank_bitmask_few", x)
    lowrank_u, lowrank_v, values = _factors("lowrank_bitmask_few", lowrank_u, lowrank_v, values)
    bias = None if bias is None else _float32("lowrank_bitmask_few", bias)
    return lowrank_few_call(lowrank_u, lowrank_v, bias, mask, values, torch.float32)(x)


def quantized_few_call(u: tuple[torch.Tensor, torch.Tensor], v: tuple[torch.Tensor, torch.Tensor],
                       bias: torch.Tensor | None, mask: torch.Tensor, values: tuple[torch.Tensor, torch.Tensor],
                       nnz: int, bits: int, group_size: int, io_dtype: torch.dtype) -> FewCall | None:
    """The `FewCall` of a quantized bitmask layer (`quantized_bitmask_few` says what it reads), or None where its
    tensors are not as the kernel reads them (other devices, strides, dtypes: the scales in one dtype of
    FACTOR_SUFFIXES, bias in `io_dtype`, which is float32 or theirs) or this build has no few-token kernels."""
    (u_codes, u_scales), (v_codes, v_scales), (s_codes, s_scales) = u, v, values
    rank, m, n = u_codes.shape[0], mask.shape[0], v_codes.shape[1] * 8 // bits
    if (mask.shape[1] != -(-n // 8) or u_codes.shape[1] * 8 != m * bits or v_codes.shape[0] != rank
            or s_codes.numel() * 8 < nnz * bits):
        raise ValueError(f"quantized_bitmask_few: shapes U codes {tuple(u_codes.shape)}, V codes "
                         f"{tuple(v_codes.shape)}, mask {tuple(mask.shape)}, {s_codes.numel()} value code bytes for "
                         f"nnz={nnz} at {bits} bits disagree")
    dtype = u_scales.dtype
    if (not few_tokens() or dtype not in FACTOR_SUFFIXES or io_dtype not in (torch.float32, dtype)
            or v_scales.dtype != dtype or s_scales.dtype != dtype or (bias is not None and bias.dtype != io_dtype)
            or any(t.dtype != torch.uint8 for t in (mask, u_codes, v_codes, s_codes))
            or not _stored(u_codes, u_scales, v_codes, v_scales, bias, mask, s_codes, s_scales)):
        return None
    weights = (n, u_codes.data_ptr(), u_scales.data_ptr(), v_codes.data_ptr(), v_scales.data_ptr(), rank,
               None if bias is None else bias.data_ptr(), mask.data_ptr(), m, mask.shape[1], s_codes.data_ptr(),
               s_scales.data_ptr(), nnz, bits, group_size)
    return FewCall("quantized_few", dtype, bitmask_library().lrs_quantized_few_workspace_floats, weights,
                   (n, m, rank, nnz), io_dtype, math.inf)


def quantized_bitmask_few(x: torch.Tensor, u: tuple[torch.Tensor, torch.Tensor], v: tuple[torch.Tensor, torch.Tensor],
                          bias: torch.Tensor | None, mask: torch.Tensor, values: tuple[torch.Tensor, torch.Tensor],
                          nnz: int, bits: int, group_size: int) -> torch.Tensor:
    """x (U V + S)^T + bias (float32) for any rows of x (`few_tokens()` must be non-zero: an AVX2 build; rows go
    in groups of that many, each group sharing the loaded weights), reading the factors as group codes
    (`nn.quantize`): `u`, `v` and `values` are each (codes, scales), U's codes transposed (rank, m), V's (rank, n),
    S's values' (whole groups; the first `nnz` are S's). Each row is dequantized into a per-thread buffer while its
    product runs, so that decoding reads the layer's bytes once, as codes; with bfloat16 scales on a CPU with
    AVX512-BF16 the products run in bfloat16 pairs (x must then hold bfloat16 values, as the layer's input in its
    factors' dtype does), and on one with AVX2 alone 4-bit codes in groups of a multiple of 32 are looked up into
    bfloat16 words by byte shuffles (float32 products)."""
    name = "quantized_bitmask_few"
    if x.shape[1] * bits != v[0].shape[1] * 8:
        raise ValueError(f"{name}: x {tuple(x.shape)} and V codes {tuple(v[0].shape)} at {bits} bits disagree")
    if x.shape[0] < 1 or not few_tokens():
        raise ValueError(f"{name}: {x.shape[0]} rows, or a build without the few-token kernels")
    mask, x = _mask(name, mask), _float32(name, x)
    u_codes, v_codes, s_codes = (_cpu(name, t) for t in (u[0], v[0], values[0]))
    u_scales, v_scales, s_scales = _factors(name, u[1], v[1], values[1])
    bias = None if bias is None else _float32(name, bias)
    return quantized_few_call((u_codes, u_scales), (v_codes, v_scales), bias, mask, (s_codes, s_scales), nnz, bits,
                              group_size, torch.float32)(x)


def quantized_to_dense(mask: torch.Tensor, values: tuple[torch.Tensor, torch.Tensor], nnz: int, bits: int,
                       group_size: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """S as a dense (rows, cols) tensor in `dtype` from `mask` and its values' codes and scales (whole groups; the
    first `nnz` are S's): the dense rebuild of long inputs, without S's values in float first. bfloat16 is written
    directly where this build multiplies in bfloat16 pairs, else through float32. The result may be this thread's
    rebuild buffer (`_rebuild_buffer`): use it before the next call, and never keep it."""
    name = "quantized_to_dense"
    codes, (scales,) = values[0], _factors(name, values[1])
    if mask.shape[1] != -(-cols // 8) or codes.numel() * 8 < nnz * bits:
        raise ValueError(f"{name}: mask {tuple(mask.shape)}, {codes.numel()} code bytes for nnz={nnz} at {bits} bits "
                         f"and {cols} columns disagree")
    mask, codes = _mask(name, mask), _cpu(name, codes)
    library, threads = bitmask_library(), torch.get_num_threads()
    direct = dtype == torch.bfloat16 and library.lrs_bf16_pairs()
    dense = _rebuild_buffer((mask.shape[0], cols), torch.bfloat16 if direct else torch.float32)
    work = _workspace(library.lrs_quantized_workspace_floats(1, cols, 0, threads))
    status = _entry("lrs_quantized_to_dense", scales.dtype)(
        mask.data_ptr(), mask.shape[0], cols, mask.shape[1], codes.data_ptr(), scales.data_ptr(), nnz, bits, group_size,
        dense.data_ptr(), int(bool(direct)), *work, threads)
    _check(status, name, nnz, mask.shape[0])
    return dense.to(dtype)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """A stream of group codes (`nn.quantize`: `codes` packed, one scale per `group_size` codes) as float32 values,
    each code * scale rounded to the scales' dtype first, as `quantize.dequantize_groups` computes them."""
    name = "dequantize_codes"
    codes, (scales,) = _cpu(name, codes), _factors(name, scales)
    count = codes.numel() * 8 // bits
    if scales.numel() * group_size != count:
        raise ValueError(f"{name}: {count} codes do not make {scales.numel()} groups of {group_size}")
    out = torch.empty(count, dtype=torch.float32)
    _entry("lrs_dequantize", scales.dtype)(codes.data_ptr(), scales.data_ptr(), bits, group_size, count,
                                           out.data_ptr(), torch.get_num_threads())
    return out


def bitmask_to_dense(mask: torch.Tensor, values: torch.Tensor, cols: int) -> torch.Tensor:
    """S as a dense float32 (rows, cols) tensor, from `mask` (rows, ceil(cols / 8)) and row-major `values`."""
    if mask.shape[1] != -(-cols // 8):
        raise ValueError(f"bitmask_to_dense: mask {tuple(mask.shape)} does not cover {cols} columns")
    mask, (values,) = _mask("bitmask_to_dense", mask), _factors("bitmask_to_dense", values)
    dense = torch.empty(mask.shape[0], cols, dtype=torch.float32)
    status = _entry("lrs_bitmask_to_dense", values.dtype)(mask.data_ptr(), mask.shape[0], cols, mask.shape[1],
                                                          values.data_ptr(), values.numel(), dense.data_ptr(),
                                                          torch.get_num_threads())
    _check(status, "bitmask_to_dense", values.numel(), mask.shape[0])
    return dense


# The tensors as the C code reads them: contiguous CPU arrays (the caller keeps the returned tensors alive for
# the call, as their pointers are all the C code gets).
def _cpu(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type != "cpu":
        raise ValueError(f"{name}: the kernels take CPU tensors, got one on {tensor.device}")
    return tensor.contiguous()


def _mask(name: str, mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype != torch.uint8:
        raise ValueError(f"{name}: the bitmask must be uint8, got {mask.dtype}")
    return _cpu(name, mask)


def _float32(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Inputs and bias: float32 whatever the factors' dtype (every sum is float32)."""
    return _cpu(name, tensor).to(torch.float32)


def _factors(name: str, *factors: torch.Tensor) -> list[torch.Tensor]:
    """U, V and S's values as stored where they share a dtype the kernels read (FACTOR_SUFFIXES): converting
    them on every call would cost a pass over the layer's bytes, as much as decoding a token reads; else all
    in float32."""
    dtype = factors[0].dtype
    if dtype not in FACTOR_SUFFIXES or any(t.dtype != dtype for t in factors):
        dtype = torch.float32
    return [_cpu(name, t).to(dtype) for t in factors]


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


def _rebuild_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """This thread's buffer for a dense rebuild, kept between calls and grown to the largest rebuilt layer: a fresh
    90 MB tensor costs about 27 ms of page faults on first touch (a 4096 x 11008 bfloat16 layer), a third of its
    512-token product. It holds one dense layer's bytes for as long as the thread lives."""
    size = math.prod(shape) * dtype.itemsize
    buffer = getattr(_thread_state, "rebuild", None)
    if buffer is None or buffer.numel() < size:
        buffer = _thread_state.rebuild = torch.empty(size, dtype=torch.uint8)
    return buffer[:size].view(dtype).view(shape)


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
    mask, x, (values,) = _mask(name, mask), _float32(name, x), _factors(name, values)
    if x.shape[0] == 0:
        return out
    library = bitmask_library()
    work = () if rank is None else _workspace(library.lrs_workspace_floats(x.shape[0], x.shape[1], rank))
    status = _entry(name, values.dtype)(
        x.data_ptr(), x.shape[0], x.shape[1], *before_mask, mask.data_ptr(), out.shape[1], mask.shape[1], values.data_ptr(),
        values.numel(), out.data_ptr(), *work, torch.get_num_threads())
    _check(status, name, values.numel(), x.shape[0])
    return out
