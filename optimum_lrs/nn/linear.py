"""`LowRankSparseLinear`: a linear layer whose weight is stored as U V + S, never as a dense matrix."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from . import kernels, ops

# How S's positions are stored: CSR (column index per entry + row pointer) or a bitmask over all m x n
# positions. Which is smaller depends on S's density and the value dtype (docs/checkpoint-format.md).
SPARSE_FORMATS = ("csr", "bitmask")
_INDEX_NAMES = {"csr": ("sparse_col_indices", "sparse_row_offsets"), "bitmask": ("sparse_bitmask",)}


def factor_names(sparse_format: str) -> tuple[str, ...]:
    """Tensor names inside a compressed layer of that format; they are the checkpoint's key suffixes too."""
    return ("lowrank_u", "lowrank_v", "sparse_values", *_INDEX_NAMES[sparse_format])


# From this many input rows (tokens) on, a layer multiplies by a transiently rebuilt dense weight instead of
# running a sparse kernel: at ~40% density torch's CSR kernel costs 3-4x a dense matmul for 512 tokens, the
# rebuild ~1.1-1.2x, while below ~256 tokens the kernels are ahead (docs/performance.md). Not when the input
# needs a gradient (see forward), and not for bitmask layers whose S is at most
# `BITMASK_KERNEL_MAX_DENSITY` dense: the C kernel's whole-layer product beats both there at any length.
DENSE_REBUILD_TOKENS = 256
BITMASK_KERNEL_MAX_DENSITY = 0.5

# Every name a compressed layer's tensor can have, whatever its format.
FACTOR_NAMES = tuple(dict.fromkeys(n for f in SPARSE_FORMATS for n in factor_names(f)))
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool (m, n) mask as uint8 (m, ceil(n / 8)): column j is bit j % 8 (least significant first) of byte j // 8."""
    rows, cols = mask.shape
    padded = torch.nn.functional.pad(mask, (0, -cols % 8)).view(rows, -1, 8).to(torch.uint8)
    return (padded << _BIT_SHIFTS.to(mask.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of `pack_bits`: a bool (m, cols) mask."""
    bits = (packed.unsqueeze(-1) >> _BIT_SHIFTS.to(packed.device)) & 1
    return bits.view(packed.shape[0], -1)[:, :cols].bool()


@contextlib.contextmanager
def _quiet_sparse() -> Iterator[None]:
    """Silence torch's "sparse CSR support is in beta" notice, which would otherwise fire on every forward."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        yield


def index_dtype_for(max_value: int) -> torch.dtype:
    """The narrowest signed integer dtype that holds every value in [0, max_value]."""
    for dtype in (torch.int16, torch.int32):
        if max_value <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


class _FrozenSparseMatmul(torch.autograd.Function):
    """(S x^T)^T for a frozen CSR matrix S: gradients flow to x only, through a precomputed S^T."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, sparse: torch.Tensor, sparse_t: torch.Tensor) -> torch.Tensor:
        ctx.sparse_t = sparse_t
        with _quiet_sparse():
            return torch.sparse.mm(sparse, flat.t()).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        with _quiet_sparse():
            return torch.sparse.mm(ctx.sparse_t, grad.t().contiguous()).t(), None, None


class LowRankSparseLinear(nn.Module):
    """y = x (U V + S)^T + b, with U (out x r), V (r x in) dense and S (out x in) sparse; the dense weight
    is never stored, only rebuilt transiently inside a forward over many tokens.

    S's non-zeros are `sparse_values` in row-major order. Their positions are, for `sparse_format="csr"`,
    `sparse_col_indices` (narrowest integer dtype that indexes `in_features`) and `sparse_row_offsets`
    (narrowest dtype that holds nnz), multiplied with torch's CSR kernels; for `"bitmask"`, one bit per
    position in `sparse_bitmask`, the smallest layout when S is denser than ~1/16 (float32), multiplied on
    CPU by the C kernels of `optimum_lrs.nn.kernels` (without them, by a dense weight rebuilt in each forward).
    From `DENSE_REBUILD_TOKENS` input rows on, a forward without gradient multiplies by a transiently rebuilt
    dense weight, except for bitmask layers on the kernels with S at most `BITMASK_KERNEL_MAX_DENSITY` dense.
    There is deliberately no `.weight`: transformers, PEFT and accelerate treat a `.weight` as a dense
    matrix to load or cast.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        nnz: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        sparse_format: str = "csr",
    ):
        super().__init__()
        if sparse_format not in SPARSE_FORMATS:
            raise ValueError(f"LowRankSparseLinear sparse_format must be one of {SPARSE_FORMATS}, got {sparse_format!r}")
        if min(in_features, out_features) < 1 or rank < 0 or nnz < 0:
            raise ValueError(
                f"LowRankSparseLinear needs positive in/out features and non-negative rank and nnz, got "
                f"in={in_features}, out={out_features}, rank={rank}, nnz={nnz}"
            )
        if nnz > in_features * out_features:
            raise ValueError(f"LowRankSparseLinear: nnz={nnz} exceeds {out_features}x{in_features} entries")
        self.in_features = in_features
        self.out_features = out_features
        self.sparse_format = sparse_format
        factory = {"dtype": dtype or torch.get_default_dtype(), "device": device}
        self.lowrank_u = nn.Parameter(torch.empty(out_features, rank, **factory), requires_grad=False)
        self.lowrank_v = nn.Parameter(torch.empty(rank, in_features, **factory), requires_grad=False)
        self.sparse_values = nn.Parameter(torch.empty(nnz, **factory), requires_grad=False)
        if sparse_format == "csr":
            self.register_buffer(
                "sparse_col_indices", torch.empty(nnz, dtype=index_dtype_for(in_features - 1), device=device)
            )
            self.register_buffer(
                "sparse_row_offsets", torch.empty(out_features + 1, dtype=index_dtype_for(nnz), device=device)
            )
        else:
            self.register_buffer(
                "sparse_bitmask", torch.empty(out_features, -(-in_features // 8), dtype=torch.uint8, device=device)
            )
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None

    @classmethod
    def from_factors(
        cls,
        lowrank_u: torch.Tensor,
        lowrank_v: torch.Tensor,
        sparse: torch.Tensor,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> LowRankSparseLinear:
        """Build from U (out x r), V (r x in) and S given as a dense (out x in) or CSR tensor."""
        with _quiet_sparse():
            csr = sparse if sparse.layout == torch.sparse_csr else sparse.to_sparse_csr()
        return cls.from_csr(lowrank_u, lowrank_v, csr.crow_indices(), csr.col_indices(), csr.values(), bias, dtype)

    @classmethod
    def from_csr(
        cls,
        lowrank_u: torch.Tensor,
        lowrank_v: torch.Tensor,
        row_offsets: torch.Tensor,
        col_indices: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        sparse_format: str = "csr",
    ) -> LowRankSparseLinear:
        """Build from U, V and S's CSR arrays (column indices strictly ascending within each row), stored
        in `sparse_format`."""
        out_features, rank = lowrank_u.shape
        in_features = lowrank_v.shape[1]
        nnz = values.numel()
        if lowrank_v.shape[0] != rank or row_offsets.shape != (out_features + 1,) or col_indices.shape != (nnz,):
            raise ValueError(
                f"incompatible factor shapes U {tuple(lowrank_u.shape)}, V {tuple(lowrank_v.shape)}, "
                f"row_offsets {tuple(row_offsets.shape)}, col_indices {tuple(col_indices.shape)}, values ({nnz},)"
            )
        layer = cls(in_features, out_features, rank, nnz, bias is not None, dtype or lowrank_u.dtype, lowrank_u.device)
        with torch.no_grad():
            layer.lowrank_u.copy_(lowrank_u)
            layer.lowrank_v.copy_(lowrank_v)
            layer.sparse_values.copy_(values)
            layer.sparse_col_indices.copy_(col_indices)
            layer.sparse_row_offsets.copy_(row_offsets)
            if bias is not None:
                layer.bias.copy_(bias)
        problem = layer.csr_problem()
        if problem:
            raise ValueError(f"invalid CSR arrays for a {out_features}x{in_features} matrix: {problem}")
        return layer if sparse_format == "csr" else layer.with_sparse_format(sparse_format)

    def with_sparse_format(self, sparse_format: str) -> LowRankSparseLinear:
        """This layer with S's positions stored in `sparse_format` (the same tensors when it already is)."""
        if sparse_format == self.sparse_format:
            return self
        factory = {"dtype": self.lowrank_u.dtype, "device": self.lowrank_u.device}
        layer = type(self)(self.in_features, self.out_features, self.rank, self.nnz, self.bias is not None,
                           sparse_format=sparse_format, **factory)
        rows, cols = self.csr_arrays()
        with torch.no_grad():
            for name in ("lowrank_u", "lowrank_v", "sparse_values", "bias"):
                if getattr(self, name) is not None:
                    getattr(layer, name).copy_(getattr(self, name))
            if sparse_format == "csr":
                layer.sparse_col_indices.copy_(cols)
                layer.sparse_row_offsets.copy_(rows)
            else:
                mask = torch.zeros(self.out_features, self.in_features, dtype=torch.bool, device=cols.device)
                row_ids = torch.repeat_interleave(torch.arange(self.out_features, device=cols.device), rows.long().diff())
                mask[row_ids, cols.long()] = True
                layer.sparse_bitmask.copy_(pack_bits(mask))
        return layer

    def csr_arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """S's row offsets and column indices (int64 for the bitmask format, stored dtypes for CSR)."""
        if self.sparse_format == "csr":
            return self.sparse_row_offsets, self.sparse_col_indices
        mask = unpack_bits(self.sparse_bitmask, self.in_features)
        rows = torch.zeros(self.out_features + 1, dtype=torch.long, device=mask.device)
        rows[1:] = mask.sum(1).cumsum(0)
        return rows, mask.nonzero()[:, 1]

    def csr_problem(self) -> str | None:
        """Why the stored positions of S do not describe a valid sparse matrix, or None when they do."""
        if self.sparse_format == "bitmask":
            set_bits = int(unpack_bits(self.sparse_bitmask, self.sparse_bitmask.shape[1] * 8).sum())
            if set_bits != self.nnz:
                return f"sparse_bitmask sets {set_bits} bits, expected nnz={self.nnz} (padding bits must be 0)"
            return None
        rows, cols = self.sparse_row_offsets.long(), self.sparse_col_indices.long()
        if int(rows[0]) != 0 or int(rows[-1]) != self.nnz or bool((rows[1:] < rows[:-1]).any()):
            return f"sparse_row_offsets must rise from 0 to nnz={self.nnz}"
        if self.nnz and (int(cols.min()) < 0 or int(cols.max()) >= self.in_features):
            return f"sparse_col_indices must lie in [0, {self.in_features})"
        # Within a row the columns must strictly ascend: values are in row-major order (the bitmask format
        # and the checkpoint format rely on it) and a repeated position would be counted twice.
        new_row = torch.zeros(self.nnz, dtype=torch.bool, device=cols.device)
        new_row[rows[:-1][rows[:-1] < self.nnz]] = True
        if self.nnz > 1 and bool(((cols[1:] <= cols[:-1]) & ~new_row[1:]).any()):
            return "sparse_col_indices must strictly ascend within each row"
        return None

    @property
    def rank(self) -> int:
        return self.lowrank_u.shape[1]

    @property
    def nnz(self) -> int:
        return self.sparse_values.numel()

    @property
    def num_parameters(self) -> int:
        """Kept weight parameters as the budget counts them: r (m + n) + nnz (bias and indices excluded)."""
        return self.rank * (self.in_features + self.out_features) + self.nnz

    @property
    def nbytes(self) -> int:
        """Bytes this layer holds, indices and bias included."""
        return sum(t.numel() * t.element_size() for t in (*self.parameters(), *self.buffers()))

    def sparse_matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """S as a torch CSR tensor (int32 indices, as the kernels want), optionally cast to `dtype`."""
        values = self.sparse_values if dtype is None else self.sparse_values.to(dtype)
        rows, cols = self.csr_arrays()
        with _quiet_sparse():
            return torch.sparse_csr_tensor(
                rows.to(torch.int32),
                cols.to(torch.int32),
                values,
                (self.out_features, self.in_features),
                check_invariants=False,  # indices were validated when the layer was built or loaded
            )

    def dense_weight(self) -> torch.Tensor:
        """U V + S as a dense matrix: for tests and export, never used by `forward`."""
        return self.lowrank_u @ self.lowrank_v + self.sparse_matrix().to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"LowRankSparseLinear expected last dimension {self.in_features}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features).to(self.lowrank_u.dtype)
        # Autograd would keep each rebuilt weight alive until backward (a dense copy of every layer during
        # training), so inputs that need a gradient stay on the sparse kernel.
        needs_grad = torch.is_grad_enabled() and flat.requires_grad
        on_kernels = self._on_kernels(flat)
        rebuild = flat.shape[0] >= DENSE_REBUILD_TOKENS and not needs_grad
        dense_s = self.nnz > BITMASK_KERNEL_MAX_DENSITY * self.in_features * self.out_features
        if on_kernels and not (rebuild and dense_s):
            return self._bitmask_kernel_forward(flat, needs_grad).reshape(*lead, self.out_features)
        if self.sparse_format == "bitmask" or rebuild:
            return torch.nn.functional.linear(flat, self._rebuilt_weight(), self.bias).reshape(*lead, self.out_features)
        out = (flat @ self.lowrank_v.t()) @ self.lowrank_u.t()
        if self.nnz:
            # CPU sparse kernels (MKL) exist only for float32/float64: run half precision through float32.
            compute = torch.float32 if flat.device.type == "cpu" and flat.dtype in (torch.float16, torch.bfloat16) else flat.dtype
            sparse = self.sparse_matrix(compute)
            if torch.is_grad_enabled() and flat.requires_grad:
                sparse_out = _FrozenSparseMatmul.apply(flat.to(compute), sparse, self._transposed(sparse))
            else:
                sparse_out = torch.sparse.mm(sparse, flat.to(compute).t()).t()
            out = out + sparse_out.to(out.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)

    def _on_kernels(self, *inputs: torch.Tensor) -> bool:
        """Whether the C kernels run this bitmask layer: built here, CPU tensors, factors in a dtype they read."""
        return (self.sparse_format == "bitmask" and kernels.can_run(self.sparse_bitmask, *inputs)
                and kernels.takes_factor_dtype(self.sparse_values.dtype))

    def _bitmask_kernel_forward(self, flat: torch.Tensor, needs_grad: bool) -> torch.Tensor:
        """The layer by the C kernels (`ops`, operators that torch.compile traces), no dense weight: the whole layer
        in one fused call; under autograd x (U V)^T + b by torch plus x S^T by the kernel (differentiable in x).
        The kernels read bfloat16 and float16 factors as stored and sum in float32; the result takes the input's
        dtype."""
        if needs_grad:
            out = nn.functional.linear(nn.functional.linear(flat, self.lowrank_v), self.lowrank_u, self.bias)
            return out + ops.bitmask_matmul(flat, self.sparse_bitmask, self.sparse_values).to(out.dtype)
        out = ops.lowrank_bitmask_linear(flat.to(torch.float32), self.lowrank_u, self.lowrank_v, self.bias,
                                         self.sparse_bitmask, self.sparse_values)
        return out.to(flat.dtype)

    def _rebuilt_weight(self) -> torch.Tensor:
        """U V + S as a transient dense matrix (values are in row-major order in both layouts)."""
        factory = {"dtype": self.lowrank_u.dtype, "device": self.lowrank_u.device}
        if self._on_kernels():
            weight = ops.bitmask_to_dense(self.sparse_bitmask, self.sparse_values, self.in_features).to(**factory)
        elif self.sparse_format == "bitmask":
            weight = torch.zeros(self.out_features, self.in_features, **factory)
            weight.masked_scatter_(unpack_bits(self.sparse_bitmask, self.in_features), self.sparse_values)
        else:
            weight = torch.zeros(self.out_features, self.in_features, **factory)
            rows = torch.repeat_interleave(torch.arange(self.out_features, device=weight.device),
                                           self.sparse_row_offsets.long().diff())
            weight[rows, self.sparse_col_indices.long()] = self.sparse_values
        return weight.addmm_(self.lowrank_u, self.lowrank_v) if self.rank else weight

    def _transposed(self, sparse: torch.Tensor) -> torch.Tensor:
        """S^T in CSR, built once per factor tensor: the input gradient is S^T g, and letting autograd
        transpose the CSR matrix on every backward costs orders of magnitude more (LoRA training)."""
        key = (self.sparse_values.data_ptr(), self.sparse_values._version, sparse.dtype, sparse.device)
        cached = getattr(self, "_transposed_cache", None)
        if cached is None or cached[0] != key:
            with _quiet_sparse():
                cached = (key, sparse.t().to_sparse_csr())
            self._transposed_cache = cached
        return cached[1]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"nnz={self.nnz}, bias={self.bias is not None}, sparse_format={self.sparse_format}"
        )
