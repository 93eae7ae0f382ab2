"""`LowRankSparseLinear`: a linear layer whose weight is stored as U V + S, never as a dense matrix."""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .storage import SPARSE_FORMATS, STORAGES, SparseStorage, quiet_sparse


class LowRankSparseLinear(nn.Module):
    """y = x (U V + S)^T + b, with U (out x r), V (r x in) dense and S (out x in) sparse; the dense weight
    is never stored, only rebuilt transiently inside a forward over many tokens.

    S's non-zeros are `sparse_values` in row-major order; how their positions are stored, validated and
    multiplied is the layout's (`sparse_format`, a `storage.SparseStorage`): `"csr"` (column index per entry
    and row pointer, torch's CSR kernels) or `"bitmask"` (one bit per position, the package's CPU kernels).
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
        self._register_factors(rank, nnz, factory)
        for name, (shape, index_dtype) in self.storage.index_specs(out_features, in_features, nnz).items():
            self.register_buffer(name, torch.empty(shape, dtype=index_dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None

    def _register_factors(self, rank: int, nnz: int, factory: dict) -> None:
        """U, V and S's values as frozen parameters (what transformers casts with `dtype=` and PEFT trains around)."""
        self.lowrank_u = nn.Parameter(torch.empty(self.out_features, rank, **factory), requires_grad=False)
        self.lowrank_v = nn.Parameter(torch.empty(rank, self.in_features, **factory), requires_grad=False)
        self.sparse_values = nn.Parameter(torch.empty(nnz, **factory), requires_grad=False)

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
        with quiet_sparse():
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
        layer = cls(in_features, out_features, rank, nnz, bias is not None, dtype or lowrank_u.dtype, lowrank_u.device,
                    sparse_format="csr")
        with torch.no_grad():
            layer._copy_factors(lowrank_u, lowrank_v, values, bias)
            layer.storage.fill(layer, row_offsets, col_indices)
        problem = layer.csr_problem()
        if problem:
            raise ValueError(f"invalid CSR arrays for a {out_features}x{in_features} matrix: {problem}")
        return layer.with_sparse_format(sparse_format)

    def with_sparse_format(self, sparse_format: str) -> LowRankSparseLinear:
        """This layer with S's positions stored in `sparse_format` (the same tensors when it already is)."""
        if sparse_format == self.sparse_format:
            return self
        layer = self._empty_like(sparse_format)
        rows, cols = self.csr_arrays()
        with torch.no_grad():
            layer._take_factors(self)
            layer.storage.fill(layer, rows, cols)
        return layer

    def _empty_like(self, sparse_format: str) -> LowRankSparseLinear:
        """An uninitialised layer of this one's class, sizes and dtype, in `sparse_format`."""
        return LowRankSparseLinear(self.in_features, self.out_features, self.rank, self.nnz, self.bias is not None,
                                   self.factor_dtype, self.lowrank_u.device, sparse_format)

    def _take_factors(self, other: LowRankSparseLinear) -> None:
        """U, V, S's values and bias copied from a layer of the same class and sizes, as stored."""
        self._copy_factors(other.lowrank_u, other.lowrank_v, other.sparse_values, other.bias)

    def _copy_factors(self, lowrank_u: torch.Tensor, lowrank_v: torch.Tensor, values: torch.Tensor,
                      bias: torch.Tensor | None) -> None:
        self.lowrank_u.copy_(lowrank_u)
        self.lowrank_v.copy_(lowrank_v)
        self.sparse_values.copy_(values)
        if bias is not None:
            self.bias.copy_(bias)

    @property
    def storage(self) -> SparseStorage:
        """The object that owns S's layout: index tensors, validation, dense rebuild and the product."""
        return STORAGES[self.sparse_format]

    def csr_arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """S's row offsets and column indices (int64 for the bitmask layout, stored dtypes for CSR)."""
        return self.storage.csr_arrays(self)

    def sparse_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The row and the column (int64) of each of S's values, in the values' order."""
        rows, cols = self.csr_arrays()
        return torch.repeat_interleave(torch.arange(self.out_features, device=cols.device), rows.long().diff()), cols.long()

    def csr_problem(self) -> str | None:
        """Why the stored positions of S do not describe a valid sparse matrix, or None when they do."""
        return self.storage.problem(self)

    @property
    def rank(self) -> int:
        return self.lowrank_u.shape[1]

    @property
    def factor_dtype(self) -> torch.dtype:
        """The dtype the layer computes in: its factors'."""
        return self.lowrank_u.dtype

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
        with quiet_sparse():
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
        call = self._decoding_call(x)
        if call is not None:
            return call(x)
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features).to(self.factor_dtype)
        # in the input's dtype, as the rest of the model computes: factors stored in another dtype (a float32
        # model with bfloat16 factors) must not hand their dtype on (attention refuses mixed q / k / v dtypes)
        return self.storage.forward(self, flat).reshape(*lead, self.out_features).to(x.dtype)

    def _tensors(self, names: tuple[str, ...]) -> list[torch.Tensor | None]:
        """The named parameters and buffers (None where unset), read from the module's own tables: `getattr` goes
        through `nn.Module.__getattr__`, which decoding would pay per tensor, layer and token."""
        params, buffers = self._parameters, self._buffers
        return [params[n] if n in params else buffers.get(n) for n in names]

    def _decodes(self, x: torch.Tensor) -> bool:
        """Whether x may go straight to a prepared kernel call (`_decoding_call`, which bounds its rows): eager mode,
        a contiguous CPU tensor in the factors' dtype, no gradient."""
        return (not torch.compiler.is_compiling() and x.is_cpu and x.dtype == self.factor_dtype and x.is_contiguous()
                and not (x.requires_grad and torch.is_grad_enabled()))

    def _decoding_call(self, x: torch.Tensor) -> kernels.FewCall | None:
        """The layer's prepared kernel call for x (a decoding step), or None for `forward`'s general path: the
        call reads x, bias and output in the factors' dtype and skips that path's casts, reshapes and checks,
        which cost several times a small layer's product (docs/performance.md, "Decoding overhead")."""
        if self._decodes(x) and 0 < x.numel() <= kernels.few_tokens() * self.in_features:
            return self.storage.decoding_call(self)
        return None

    def _sparse_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """S as a transient dense matrix in `dtype` (default: the factors'), on the factors' device: possibly a
        buffer the next call reuses (a quantized layer's rebuild), so use it at once, outside autograd, and never
        keep it."""
        return self.storage.dense(self).to(dtype=dtype or self.lowrank_u.dtype, device=self.lowrank_u.device)

    def _rebuilt_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """U V + S as a transient dense matrix in `dtype` (default: the factors')."""
        weight = self._sparse_dense(dtype)
        return weight.addmm_(self.lowrank_u.to(weight.dtype), self.lowrank_v.to(weight.dtype)) if self.rank else weight

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"nnz={self.nnz}, bias={self.bias is not None}, sparse_format={self.sparse_format}"
        )
