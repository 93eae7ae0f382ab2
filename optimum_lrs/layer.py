"""`LowRankSparseLinear`: a linear layer whose weight is stored as U V + S, never as a dense matrix."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

# Tensor names inside a compressed layer; they are the checkpoint's key suffixes too (docs/checkpoint-format.md).
FACTOR_NAMES = ("lowrank_u", "lowrank_v", "sparse_values", "sparse_col_indices", "sparse_row_offsets")


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
    """y = x (U V + S)^T + b, with U (out x r), V (r x in) dense and S (out x in) in CSR form.

    S is kept as `sparse_values`, `sparse_col_indices` (narrowest integer dtype that indexes
    `in_features`) and `sparse_row_offsets` (narrowest dtype that holds nnz). There is deliberately
    no `.weight`: transformers, PEFT and accelerate treat a `.weight` as a dense matrix to load or cast.
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
    ):
        super().__init__()
        if min(in_features, out_features) < 1 or rank < 0 or nnz < 0:
            raise ValueError(
                f"LowRankSparseLinear needs positive in/out features and non-negative rank and nnz, got "
                f"in={in_features}, out={out_features}, rank={rank}, nnz={nnz}"
            )
        if nnz > in_features * out_features:
            raise ValueError(f"LowRankSparseLinear: nnz={nnz} exceeds {out_features}x{in_features} entries")
        self.in_features = in_features
        self.out_features = out_features
        factory = {"dtype": dtype or torch.get_default_dtype(), "device": device}
        self.lowrank_u = nn.Parameter(torch.empty(out_features, rank, **factory), requires_grad=False)
        self.lowrank_v = nn.Parameter(torch.empty(rank, in_features, **factory), requires_grad=False)
        self.sparse_values = nn.Parameter(torch.empty(nnz, **factory), requires_grad=False)
        self.register_buffer(
            "sparse_col_indices", torch.empty(nnz, dtype=index_dtype_for(in_features - 1), device=device)
        )
        self.register_buffer(
            "sparse_row_offsets", torch.empty(out_features + 1, dtype=index_dtype_for(nnz), device=device)
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
    ) -> LowRankSparseLinear:
        """Build from U, V and S's CSR arrays (column indices ascending within each row)."""
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
        return layer

    def csr_problem(self) -> str | None:
        """Why the stored CSR arrays do not describe a valid sparse matrix, or None when they do."""
        rows, cols = self.sparse_row_offsets.long(), self.sparse_col_indices.long()
        if int(rows[0]) != 0 or int(rows[-1]) != self.nnz or bool((rows[1:] < rows[:-1]).any()):
            return f"sparse_row_offsets must rise from 0 to nnz={self.nnz}"
        if self.nnz and (int(cols.min()) < 0 or int(cols.max()) >= self.in_features):
            return f"sparse_col_indices must lie in [0, {self.in_features})"
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
        with _quiet_sparse():
            return torch.sparse_csr_tensor(
                self.sparse_row_offsets.to(torch.int32),
                self.sparse_col_indices.to(torch.int32),
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
            f"nnz={self.nnz}, bias={self.bias is not None}"
        )
