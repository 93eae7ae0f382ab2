"""How a `LowRankSparseLinear` stores S's positions, one class per layout behind one interface.

A storage object is stateless and shared by every layer of its layout (`STORAGES[name]`). The tensors stay
registered on the layer under the names the checkpoint format fixes (`sparse_col_indices` /
`sparse_row_offsets`, or `sparse_bitmask`), so that transformers, accelerate and PEFT load, cast, offload and
save them like any buffer. The storage owns everything that depends on the layout: the index tensors' shapes
and dtypes, filling them from CSR arrays and reading them back, their validation, S as a dense matrix, the
layer's product and how the model card names it. A new layout is one more class here; `LowRankSparseLinear`,
the checkpoint reader and the model card do not branch on the layout's name.
"""

from __future__ import annotations

import contextlib
import platform
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from . import kernels, ops

if TYPE_CHECKING:
    from .linear import LowRankSparseLinear

_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)

# From this many input rows (tokens) on, a layer multiplies by a transiently rebuilt dense weight instead of
# running a sparse kernel: at ~40% density torch's CSR kernel costs 3-4x a dense matmul for 512 tokens, the
# rebuild ~1.1-1.2x, while below ~256 tokens the kernels are ahead (docs/performance.md). Not when the input
# needs a gradient: autograd would keep each rebuilt weight alive until backward (a dense copy of every layer
# during training). Not for bitmask layers whose S is at most `BITMASK_KERNEL_MAX_DENSITY` dense either: the C
# kernel's whole-layer product beats both there at any length.
DENSE_REBUILD_TOKENS = 256
BITMASK_KERNEL_MAX_DENSITY = 0.5


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool (m, n) mask as uint8 (m, ceil(n / 8)): column j is bit j % 8 (least significant first) of byte j // 8."""
    rows, cols = mask.shape
    padded = torch.nn.functional.pad(mask, (0, -cols % 8)).view(rows, -1, 8).to(torch.uint8)
    return (padded << _BIT_SHIFTS.to(mask.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of `pack_bits`: a bool (m, cols) mask."""
    bits = (packed.unsqueeze(-1) >> _BIT_SHIFTS.to(packed.device)) & 1
    return bits.view(packed.shape[0], -1)[:, :cols].bool()


def index_dtype_for(max_value: int) -> torch.dtype:
    """The narrowest signed integer dtype that holds every value in [0, max_value]."""
    for dtype in (torch.int16, torch.int32):
        if max_value <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


@contextlib.contextmanager
def quiet_sparse() -> Iterator[None]:
    """Silence torch's "sparse CSR support is in beta" notice, which would otherwise fire on every forward."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        yield


def needs_grad(flat: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and flat.requires_grad


@torch.compiler.assume_constant_result
def _half_matmul_is_slow() -> bool:
    """Whether torch multiplies bfloat16 and float16 matrices far slower than float32 on this CPU: x86 below
    AVX-512 (AVX2 has no half-precision arithmetic, so torch widens every block), where a bfloat16 GEMM of a
    4096 x 11008 layer measured 2.6x (32 rows) to 5.7x (512 rows) the float32 one's time (2 threads, first-generation
    EPYC). Fixed for the process."""
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() != "AVX512"


def product_dtype(flat: torch.Tensor) -> torch.dtype:
    """The dtype a rebuilt dense product computes in: the input's, but float32 for a half-precision input on a CPU
    whose half-precision matmul is slow (`_half_matmul_is_slow`); the result is rounded to the input's dtype
    either way, and float32 products are only the more exact."""
    if flat.dtype in (torch.bfloat16, torch.float16) and flat.device.type == "cpu" and _half_matmul_is_slow():
        return torch.float32
    return flat.dtype


def dense_product(layer: LowRankSparseLinear, flat: torch.Tensor) -> torch.Tensor:
    """x W^T + b by a transiently rebuilt dense W: U V + S, or S alone with x V^T U^T added where that costs less
    than the rebuild's U V (rows (m + n) < m n: prefills shorter than about the layer's width; at 512 tokens a
    4096 x 11008 layer of rank 448 would otherwise spend more on U V than on the product itself). In
    `product_dtype`: a bfloat16 layer on an AVX2 CPU rebuilds W in float32."""
    m, n = layer.out_features, layer.in_features
    dtype = product_dtype(flat)
    x, bias = flat.to(dtype), None if layer.bias is None else layer.bias.to(dtype)
    if layer.rank and flat.shape[0] * (m + n) < m * n:
        sparse = layer._sparse_dense(dtype)
        lowrank = nn.functional.linear(nn.functional.linear(x, layer.lowrank_v.to(dtype)), layer.lowrank_u.to(dtype))
        out = nn.functional.linear(x, sparse, bias) + lowrank
    else:
        out = nn.functional.linear(x, layer._rebuilt_weight(dtype), bias)
    return out.to(flat.dtype)


class SparseStorage:
    """The interface every layout implements; `STORAGES` holds one instance per layout."""

    name: ClassVar[str]
    # What the model card says the positions are stored as.
    description: ClassVar[str]

    def index_specs(self, out_features: int, in_features: int, nnz: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of each index tensor of a layer of that size: what the layer registers as
        buffers and what a checkpoint's headers must hold."""
        raise NotImplementedError

    def index_names(self) -> tuple[str, ...]:
        return tuple(self.index_specs(1, 1, 0))

    def fill(self, layer: LowRankSparseLinear, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """Store the positions given as CSR arrays (columns strictly ascending within each row)."""
        raise NotImplementedError

    def csr_arrays(self, layer: LowRankSparseLinear) -> tuple[torch.Tensor, torch.Tensor]:
        """S's row offsets and column indices."""
        raise NotImplementedError

    def problem(self, layer: LowRankSparseLinear) -> str | None:
        """Why the stored positions do not describe a valid sparse matrix of `layer.nnz` entries, or None."""
        raise NotImplementedError

    def dense(self, layer: LowRankSparseLinear) -> torch.Tensor:
        """S as a dense (out x in) matrix in the factors' dtype (values are in row-major order in every layout)."""
        raise NotImplementedError

    def forward(self, layer: LowRankSparseLinear, flat: torch.Tensor) -> torch.Tensor:
        """x (U V + S)^T + b for 2-D `flat` in the factors' dtype."""
        raise NotImplementedError

    def decoding_call(self, layer: LowRankSparseLinear) -> kernels.FewCall | None:
        """The layer's prepared few-token kernel call (inputs in its factors' dtype), or None where this layout
        has none (then `forward` runs)."""
        return None


class _FrozenSparseMatmul(torch.autograd.Function):
    """(S x^T)^T for a frozen CSR matrix S: gradients flow to x only, through a precomputed S^T."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, sparse: torch.Tensor, sparse_t: torch.Tensor) -> torch.Tensor:
        ctx.sparse_t = sparse_t
        with quiet_sparse():
            return torch.sparse.mm(sparse, flat.t()).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        with quiet_sparse():
            return torch.sparse.mm(ctx.sparse_t, grad.t().contiguous()).t(), None, None


class CSRStorage(SparseStorage):
    """A column index per entry (the narrowest dtype that indexes `in_features`) and a row pointer (the
    narrowest that holds nnz), multiplied by torch's CSR kernels: the layout for devices, and the smaller one
    where S is sparser than ~1/16 in float32."""

    name = "csr"
    description = "CSR arrays"

    def index_specs(self, out_features, in_features, nnz):
        return {"sparse_col_indices": ((nnz,), index_dtype_for(in_features - 1)),
                "sparse_row_offsets": ((out_features + 1,), index_dtype_for(nnz))}

    def fill(self, layer, rows, cols):
        layer.sparse_col_indices.copy_(cols)
        layer.sparse_row_offsets.copy_(rows)

    def csr_arrays(self, layer):
        return layer.sparse_row_offsets, layer.sparse_col_indices

    def problem(self, layer):
        rows, cols, nnz = layer.sparse_row_offsets.long(), layer.sparse_col_indices.long(), layer.nnz
        if int(rows[0]) != 0 or int(rows[-1]) != nnz or bool((rows[1:] < rows[:-1]).any()):
            return f"sparse_row_offsets must rise from 0 to nnz={nnz}"
        if nnz and (int(cols.min()) < 0 or int(cols.max()) >= layer.in_features):
            return f"sparse_col_indices must lie in [0, {layer.in_features})"
        # Within a row the columns must strictly ascend: values are in row-major order (the bitmask layout and
        # the checkpoint format rely on it) and a repeated position would be counted twice.
        new_row = torch.zeros(nnz, dtype=torch.bool, device=cols.device)
        new_row[rows[:-1][rows[:-1] < nnz]] = True
        if nnz > 1 and bool(((cols[1:] <= cols[:-1]) & ~new_row[1:]).any()):
            return "sparse_col_indices must strictly ascend within each row"
        return None

    def dense(self, layer):
        values = layer.sparse_values
        weight = torch.zeros(layer.out_features, layer.in_features, dtype=values.dtype, device=values.device)
        rows = torch.repeat_interleave(torch.arange(layer.out_features, device=weight.device),
                                       layer.sparse_row_offsets.long().diff())
        weight[rows, layer.sparse_col_indices.long()] = values
        return weight

    def forward(self, layer, flat):
        if flat.shape[0] >= DENSE_REBUILD_TOKENS and not needs_grad(flat):
            return dense_product(layer, flat)
        out = (flat @ layer.lowrank_v.t()) @ layer.lowrank_u.t()
        if layer.nnz:
            # CPU sparse kernels (MKL) exist only for float32/float64: run half precision through float32.
            half_on_cpu = flat.device.type == "cpu" and flat.dtype in (torch.float16, torch.bfloat16)
            compute = torch.float32 if half_on_cpu else flat.dtype
            sparse = layer.sparse_matrix(compute)
            if needs_grad(flat):
                sparse_out = _FrozenSparseMatmul.apply(flat.to(compute), sparse, self._transposed(layer, sparse))
            else:
                with quiet_sparse():
                    sparse_out = torch.sparse.mm(sparse, flat.to(compute).t()).t()
            out = out + sparse_out.to(out.dtype)
        return out if layer.bias is None else out + layer.bias

    @staticmethod
    def _transposed(layer: LowRankSparseLinear, sparse: torch.Tensor) -> torch.Tensor:
        """S^T in CSR, built once per factor tensor and kept on the layer: the input gradient is S^T g, and
        letting autograd transpose the CSR matrix on every backward costs orders of magnitude more (LoRA)."""
        key = (layer.sparse_values.data_ptr(), layer.sparse_values._version, sparse.dtype, sparse.device)
        cached = getattr(layer, "_transposed_cache", None)
        if cached is None or cached[0] != key:
            with quiet_sparse():
                cached = (key, sparse.t().to_sparse_csr())
            layer._transposed_cache = cached
        return cached[1]


class BitmaskStorage(SparseStorage):
    """One bit per weight position (the smaller layout where S is denser than ~1/16 in float32), multiplied on
    CPU by the C kernels of `optimum_lrs.nn.kernels` (through `ops`, which torch.compile traces); without them,
    by a dense weight rebuilt in each forward."""

    name = "bitmask"
    description = "a bitmask"

    def index_specs(self, out_features, in_features, nnz):
        return {"sparse_bitmask": ((out_features, -(-in_features // 8)), torch.uint8)}

    def fill(self, layer, rows, cols):
        mask = torch.zeros(layer.out_features, layer.in_features, dtype=torch.bool, device=cols.device)
        row_ids = torch.repeat_interleave(torch.arange(layer.out_features, device=cols.device), rows.long().diff())
        mask[row_ids, cols.long()] = True
        layer.sparse_bitmask.copy_(pack_bits(mask))

    def csr_arrays(self, layer):
        mask = unpack_bits(layer.sparse_bitmask, layer.in_features)
        rows = torch.zeros(layer.out_features + 1, dtype=torch.long, device=mask.device)
        rows[1:] = mask.sum(1).cumsum(0)
        return rows, mask.nonzero()[:, 1]

    def problem(self, layer):
        set_bits = int(unpack_bits(layer.sparse_bitmask, layer.sparse_bitmask.shape[1] * 8).sum())
        if set_bits != layer.nnz:
            return f"sparse_bitmask sets {set_bits} bits, expected nnz={layer.nnz} (padding bits must be 0)"
        return None

    def dense(self, layer):
        values = layer.sparse_values
        if self._on_kernels(layer):
            return ops.bitmask_to_dense(layer.sparse_bitmask, values, layer.in_features).to(values.dtype)
        weight = torch.zeros(layer.out_features, layer.in_features, dtype=values.dtype, device=values.device)
        return weight.masked_scatter_(unpack_bits(layer.sparse_bitmask, layer.in_features), values)

    def forward(self, layer, flat):
        """Up to `kernels.few_tokens()` rows (decoding) one fused kernel call; more rows, the whole layer in one
        tiled call, or the rebuilt weight from `DENSE_REBUILD_TOKENS` rows on where S is denser than
        `BITMASK_KERNEL_MAX_DENSITY`; under autograd x (U V)^T + b by torch plus x S^T by the kernel
        (differentiable in x). The kernels read bfloat16 and float16 factors as stored and sum in float32; the
        result takes the input's dtype."""
        with_grad = needs_grad(flat)
        dense_s = layer.nnz > BITMASK_KERNEL_MAX_DENSITY * layer.in_features * layer.out_features
        if not self._on_kernels(layer, flat) or (dense_s and flat.shape[0] >= DENSE_REBUILD_TOKENS and not with_grad):
            return dense_product(layer, flat)
        mask, values = layer.sparse_bitmask, layer.sparse_values
        if with_grad:
            out = nn.functional.linear(nn.functional.linear(flat, layer.lowrank_v), layer.lowrank_u, layer.bias)
            return out + ops.bitmask_matmul(flat, mask, values).to(out.dtype)
        out = ops.lowrank_bitmask_linear(flat.to(torch.float32), layer.lowrank_u, layer.lowrank_v, layer.bias, mask,
                                         values)
        return out.to(flat.dtype)

    def decoding_call(self, layer):
        tensors = layer._tensors(("lowrank_u", "lowrank_v", "bias", "sparse_bitmask", "sparse_values"))
        return kernels.layer_call(layer, tensors, lambda: kernels.lowrank_few_call(*tensors, tensors[0].dtype))

    @staticmethod
    def _on_kernels(layer: LowRankSparseLinear, *inputs: torch.Tensor) -> bool:
        """Whether the C kernels run this layer: built here, CPU tensors, factors in a dtype they read."""
        return kernels.can_run(layer.sparse_bitmask, *inputs) and kernels.takes_factor_dtype(layer.sparse_values.dtype)


STORAGES: dict[str, SparseStorage] = {s.name: s for s in (CSRStorage(), BitmaskStorage())}
SPARSE_FORMATS = tuple(STORAGES)


def factor_names(sparse_format: str) -> tuple[str, ...]:
    """Tensor names inside a compressed layer of that layout; they are the checkpoint's key suffixes too."""
    return ("lowrank_u", "lowrank_v", "sparse_values", *STORAGES[sparse_format].index_names())


# Every name a compressed layer's tensor can have, whatever its layout.
FACTOR_NAMES = tuple(dict.fromkeys(n for f in SPARSE_FORMATS for n in factor_names(f)))
