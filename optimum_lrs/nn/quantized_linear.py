"""`QuantizedLowRankSparseLinear`: a compressed layer whose U, V and sparse values are stored as integer codes."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import kernels, ops
from .gptq import gptq_codes, inverse_factor
from .scale_fit import STEPS, fit_scales
from .linear import LowRankSparseLinear
from .storage import dense_product, needs_grad
from .quantize import check_bits, dequantize_groups, pack_codes, quantize_groups, unpack_codes

# The factors, each stored as `<name>_codes` (uint8, packed; a buffer) and `<name>_scales` (the factor dtype; a
# frozen parameter, like the float factors it replaces).
QUANTIZED_FACTORS = ("lowrank_u", "lowrank_v", "sparse_values")


# Output rows per dense product while feeding the low-rank rounding back into S (bounds the transient memory).
_FEEDBACK_ROWS = 1024
# What the decoding call reads, in `kernels.quantized_few_call`'s order.
_DECODING_TENSORS = ("lowrank_u_codes", "lowrank_u_scales", "lowrank_v_codes", "lowrank_v_scales", "bias",
                     "sparse_bitmask", "sparse_values_codes", "sparse_values_scales")
# Up to this many input rows the codes kernel runs; from one more on, the dense rebuild (S written densely from its
# codes into a kept buffer, then torch's product): on 2 cores of a Zen 4 the two cost the same at 32 rows for
# layers from 576x576 to 4096x11008, the kernel 2-3x cheaper at 8 (decoding), the rebuild 1.4x cheaper at 64.
QUANTIZED_KERNEL_ROWS = 32
# Weight entries of the layers whose codes are fitted together at most (`_stacks`): 64 MB in float32. Stacking
# spares small layers the per-column Python work of one sweep each; a layer this large spends its time in the
# column products instead, and alone holds no more memory than before.
_STACK_ENTRIES = 1 << 24


def _lowrank_change(layer: LowRankSparseLinear, rounded: QuantizedLowRankSparseLinear) -> torch.Tensor:
    """(U V - U~ V~) at S's positions, in the values' order (row-major), float32: U~, V~ the rounded factors."""
    rows, cols = layer.csr_arrays()
    u, v = layer.lowrank_u.float(), layer.lowrank_v.float()
    u_rounded, v_rounded = rounded.lowrank_u.float(), rounded.lowrank_v.float()
    change = []
    for r0 in range(0, layer.out_features, _FEEDBACK_ROWS):
        r1 = min(r0 + _FEEDBACK_ROWS, layer.out_features)
        block = u[r0:r1] @ v - u_rounded[r0:r1] @ v_rounded
        counts = rows[r0 + 1:r1 + 1].long() - rows[r0:r1].long()
        row_ids = torch.repeat_interleave(torch.arange(r1 - r0, device=block.device), counts)
        change.append(block[row_ids, cols[int(rows[r0]):int(rows[r1])].long()])
    return torch.cat(change)


def _positions(layer: LowRankSparseLinear) -> torch.Tensor:
    """S's positions as a bool (out_features, in_features) matrix: where True, in row-major order, are the values."""
    rows, cols = layer.sparse_positions()
    keep = torch.zeros(layer.out_features, layer.in_features, dtype=torch.bool, device=cols.device)
    keep[rows, cols] = True
    return keep


def _stacks(layers: list[LowRankSparseLinear]) -> list[slice]:
    """`layers` cut into runs of consecutive layers of up to `_STACK_ENTRIES` weight entries (a larger one alone)."""
    runs, start, entries = [], 0, 0
    for i, layer in enumerate(layers):
        size = layer.out_features * layer.in_features
        if i > start and entries + size > _STACK_ENTRIES:
            runs.append(slice(start, i))
            start, entries = i, 0
        entries += size
    return runs + [slice(start, len(layers))]


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors stacked along their rows (one alone as it is: no copy of a large layer's weight)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _fit_codes(outs: list[QuantizedLowRankSparseLinear], layers: list[LowRankSparseLinear], h: torch.Tensor,
               factor: torch.Tensor) -> None:
    """Codes of each layer's factors fitted to its outputs on inputs of second moment H (`nn.gptq`), into `outs`:
    V's by GPTQ's sweep over H; U refitted to the rounded V (least squares on the outputs, r x r) and swept over
    the low-rank inputs' second moment V~ H V~^T; then S's values swept over the whole rest, W - U~ V~, with S's
    positions fixed, so that what U and V's rounding changed anywhere, not only at S's positions, is made up
    where S can. Scales are those rounding to nearest would take from the tensor being swept. The layers share
    H (`factor = inverse_factor(H)`): their V's are swept stacked in one sweep, then their rests (rows never mix
    in a sweep: each layer gets the codes of its own)."""
    bits, group = outs[0].bits, outs[0].group_size
    top = 2 ** (bits - 1) - 1
    residuals = [layer.dense_weight().float() for layer in layers]
    low = [i for i, layer in enumerate(layers) if layer.rank]
    vs = [layers[i].lowrank_v.float() for i in low]
    v_scales = [quantize_groups(v, bits, group)[1] for v in vs]
    v_codes = gptq_codes(_joined(vs), factor, _joined([s.repeat_interleave(group, -1) for s in v_scales]),
                         top).split([len(v) for v in vs]) if vs else []
    for i, v, codes, scales in zip(low, vs, v_codes, v_scales):
        v_rounded = codes.float() * scales.repeat_interleave(group, -1)
        low_h = v_rounded @ h @ v_rounded.t()
        damped = low_h + 1e-6 * low_h.diagonal().mean().clamp_min(1e-30) * torch.eye(len(v), device=h.device)
        u = torch.linalg.solve(damped, (layers[i].lowrank_u.float() @ (v @ h @ v_rounded.t())).t()).t()
        u_scales = quantize_groups(u.t(), bits, group)[1]
        u_codes = gptq_codes(u, inverse_factor(low_h), u_scales.repeat_interleave(group, -1).t(), top)
        outs[i]._store_codes("lowrank_u", u_codes.t(), u_scales)
        outs[i]._store_codes("lowrank_v", codes, scales)
        residuals[i] -= (u_codes.float() * u_scales.repeat_interleave(group, -1).t()) @ v_rounded
    sparse = [i for i, layer in enumerate(layers) if layer.nnz]
    keeps = [_positions(layers[i]) for i in sparse]
    s_scales, entry_scales = [], []  # S's group scales, and each entry's scale (1 outside S)
    for i, keep in zip(sparse, keeps):
        s_scales.append(quantize_groups(nn.functional.pad(residuals[i][keep], (0, -layers[i].nnz % group)), bits,
                                        group)[1])
        entry_scales.append(torch.ones_like(residuals[i]))
        entry_scales[-1][keep] = s_scales[-1].repeat_interleave(group)[: layers[i].nnz]
    s_codes = gptq_codes(_joined([residuals[i] for i in sparse]), factor, _joined(entry_scales), top,
                         _joined(keeps)).split([len(k) for k in keeps]) if sparse else []
    for i, keep, codes, scales in zip(sparse, keeps, s_codes, s_scales):
        outs[i]._store_codes("sparse_values", nn.functional.pad(codes[keep], (0, -layers[i].nnz % group)), scales)


def quantized_nbytes(out_features: int, in_features: int, rank: int, nnz: int, index_bytes: int, bits: int,
                     group_size: int, scale_bytes: int = 2) -> int:
    """Bytes of a layer whose U, V and values are stored as `bits`-bit codes with one `scale_bytes` scale per
    group (`QuantizedLowRankSparseLinear.factor_specs`), plus `index_bytes` for S's positions (bias excluded, as
    for the dense layers it is compared with)."""
    specs = QuantizedLowRankSparseLinear.factor_specs(out_features, in_features, rank, nnz, bits, group_size,
                                                      torch.float32)
    return index_bytes + sum(math.prod(shape) * (scale_bytes if dtype.is_floating_point else 1)
                             for shape, dtype in specs.values())


class QuantizedLowRankSparseLinear(LowRankSparseLinear):
    """y = x (U V + S)^T + b as `LowRankSparseLinear`, with U, V and S's values stored as `bits`-bit group codes
    and one scale per `group_size` values (`nn.quantize`): at 4 bits about a quarter of their 16-bit bytes. S's
    positions keep their layout (`sparse_format`).

    Groups run along dimensions every layer shares: U is stored transposed (rank, out_features), grouped along
    `out_features`; V (rank, in_features) along `in_features`; S's values along their row-major stream, the last
    group zero-padded. `lowrank_u`, `lowrank_v` and `sparse_values` read the dequantized tensors; a forward
    dequantizes them once into a transient float layer and runs its product.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, nnz: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 sparse_format: str = "bitmask", bits: int = 4, group_size: int = 64):
        check_bits(bits, group_size, {"out_features": out_features, "in_features": in_features})
        self.bits, self.group_size, self._nnz = bits, group_size, nnz
        super().__init__(in_features, out_features, rank, nnz, bias, dtype, device, sparse_format)

    @staticmethod
    def factor_specs(out_features: int, in_features: int, rank: int, nnz: int, bits: int, group_size: int,
                     dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of the codes and scales of a layer of that size."""
        padded = -(-nnz // group_size) * group_size
        rows = {"lowrank_u": (rank, out_features), "lowrank_v": (rank, in_features), "sparse_values": (padded,)}
        specs = {}
        for name, shape in rows.items():
            specs[f"{name}_codes"] = ((*shape[:-1], shape[-1] * bits // 8), torch.uint8)
            specs[f"{name}_scales"] = ((*shape[:-1], shape[-1] // group_size), dtype)
        return specs

    def _register_factors(self, rank: int, nnz: int, factory: dict) -> None:
        specs = self.factor_specs(self.out_features, self.in_features, rank, nnz, self.bits, self.group_size,
                                  factory["dtype"])
        for name, (shape, dtype) in specs.items():
            tensor = torch.empty(shape, dtype=dtype, device=factory["device"])
            if dtype.is_floating_point:  # scales: cast by `dtype=` as the float factors are; PEFT finds the device
                self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
            else:
                self.register_buffer(name, tensor)

    @classmethod
    def quantize(cls, layer: LowRankSparseLinear, bits: int, group_size: int, error_feedback: bool = True,
                 second_moment: torch.Tensor | None = None, refit_scales: bool = True) -> QuantizedLowRankSparseLinear:
        """`layer` with its factors as group codes (same positions, bias and dtype).

        Without `second_moment` the codes are rounded to nearest; with `error_feedback`, U and V are rounded
        first and what their rounding changed in U V at S's positions is added to S's values before those are
        rounded: W = U V + S holds there as before, needing no dense W. With the layer's input second moment
        (in_features, in_features), the codes are fitted to the layer's outputs instead (`fit`)."""
        if second_moment is not None:
            return cls.fit([layer], bits, group_size, second_moment, refit_scales)[0]
        out = cls._shaped_as(layer, bits, group_size)
        with torch.no_grad():
            out._store("lowrank_u", layer.lowrank_u.t())
            out._store("lowrank_v", layer.lowrank_v)
            values = layer.sparse_values
            if error_feedback and layer.nnz and layer.rank:
                values = values.float() + _lowrank_change(layer, out)
            out._store("sparse_values", nn.functional.pad(values, (0, -values.numel() % group_size)))
            out._take_positions(layer)
        return out

    @classmethod
    def fit(cls, layers: list[LowRankSparseLinear], bits: int, group_size: int, second_moment: torch.Tensor,
            refit_scales: bool = True) -> list[QuantizedLowRankSparseLinear]:
        """`layers`, which all read inputs of that second moment (q, k and v; gate and up), with their codes
        fitted to their outputs (`_fit_codes`), and with `refit_scales` their scales then refitted to those
        outputs (`refit_scales`). Each layer gets the codes it would get alone."""
        outs = [cls._shaped_as(layer, bits, group_size) for layer in layers]
        with torch.no_grad():
            h = second_moment.detach().float().to(layers[0].lowrank_u.device)
            factor = inverse_factor(h)
            for stack in _stacks(layers):
                _fit_codes(outs[stack], layers[stack], h, factor)
            for out, layer in zip(outs, layers):
                out._take_positions(layer)
                if refit_scales:  # S's positions stored: the fit reads them
                    out.refit_scales(layer.dense_weight(), second_moment)
        return outs

    @classmethod
    def _shaped_as(cls, layer: LowRankSparseLinear, bits: int, group_size: int) -> QuantizedLowRankSparseLinear:
        return cls(layer.in_features, layer.out_features, layer.rank, layer.nnz, layer.bias is not None,
                   layer.factor_dtype, layer.lowrank_u.device, layer.sparse_format, bits, group_size)

    def _take_positions(self, layer: LowRankSparseLinear) -> None:
        """S's positions and the bias, as `layer` holds them."""
        for name in layer.storage.index_names():
            getattr(self, name).copy_(getattr(layer, name))
        if layer.bias is not None:
            self.bias.copy_(layer.bias)

    def _store(self, name: str, tensor: torch.Tensor) -> None:
        """Codes and scales of factor `name` from `tensor`, laid out as stored (U transposed, values padded)."""
        self._store_codes(name, *quantize_groups(tensor, self.bits, self.group_size))

    def _store_codes(self, name: str, codes: torch.Tensor, scales: torch.Tensor) -> None:
        getattr(self, f"{name}_codes").copy_(pack_codes(codes, self.bits))
        getattr(self, f"{name}_scales").copy_(scales)

    def refit_scales(self, weight: torch.Tensor, second_moment: torch.Tensor, steps: int = STEPS) -> None:
        """Every group's scale refitted, codes fixed, to bring the layer's outputs closer to `weight`'s on inputs
        of that second moment (`nn.scale_fit`)."""
        keys = {"u": "lowrank_u", "v": "lowrank_v", "s": "sparse_values"}
        codes = {k: unpack_codes(getattr(self, f"{name}_codes"), self.bits).float() for k, name in keys.items()}
        scales = {k: getattr(self, f"{name}_scales") for k, name in keys.items()}
        fitted = fit_scales(weight, second_moment, codes, scales, self.sparse_positions(), self.group_size, steps)
        for k, name in keys.items():
            getattr(self, f"{name}_scales").copy_(fitted[k])

    def _dequantized(self, name: str) -> torch.Tensor:
        codes, scales = getattr(self, f"{name}_codes"), getattr(self, f"{name}_scales")
        if kernels.can_run(codes, scales) and kernels.takes_factor_dtype(scales.dtype):
            values = kernels.dequantize_codes(codes, scales, self.bits, self.group_size)
            return values.reshape(*codes.shape[:-1], codes.shape[-1] * 8 // self.bits).to(self.factor_dtype)
        return dequantize_groups(unpack_codes(codes, self.bits), scales, self.factor_dtype)

    @property
    def lowrank_u(self) -> torch.Tensor:
        return self._dequantized("lowrank_u").t()

    @property
    def lowrank_v(self) -> torch.Tensor:
        return self._dequantized("lowrank_v")

    @property
    def sparse_values(self) -> torch.Tensor:
        return self._dequantized("sparse_values")[: self._nnz]

    @property
    def rank(self) -> int:
        return self.lowrank_u_codes.shape[0]

    @property
    def nnz(self) -> int:
        return self._nnz

    @property
    def factor_dtype(self) -> torch.dtype:
        return self.lowrank_u_scales.dtype

    def _empty_like(self, sparse_format: str) -> QuantizedLowRankSparseLinear:
        return QuantizedLowRankSparseLinear(self.in_features, self.out_features, self.rank, self.nnz,
                                            self.bias is not None, self.factor_dtype, self.lowrank_u_codes.device,
                                            sparse_format, self.bits, self.group_size)

    def _take_factors(self, other: QuantizedLowRankSparseLinear) -> None:
        for name in QUANTIZED_FACTORS:
            for part in ("codes", "scales"):
                getattr(self, f"{name}_{part}").copy_(getattr(other, f"{name}_{part}"))
        if other.bias is not None:
            self.bias.copy_(other.bias)

    def dequantized(self) -> LowRankSparseLinear:
        """The same layer with float factors (the dequantized values), sharing the index tensors and bias."""
        layer = LowRankSparseLinear(self.in_features, self.out_features, 0, 0, False, self.factor_dtype, "meta",
                                    self.sparse_format)
        for name, value in (("lowrank_u", self.lowrank_u), ("lowrank_v", self.lowrank_v),
                            ("sparse_values", self.sparse_values), ("bias", self.bias)):
            setattr(layer, name, None if value is None else nn.Parameter(value, requires_grad=False))
        for name in self.storage.index_names():
            setattr(layer, name, getattr(self, name))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Bitmask layout on the C kernels, no gradient: up to `QUANTIZED_KERNEL_ROWS` rows (decoding, batched
        decoding, short prompts) one call reading the codes (`kernels.quantized_bitmask_few`); more rows, the dense
        rebuild, S written densely from its codes (`kernels.quantized_to_dense`). Otherwise (a gradient, CSR, no
        kernels) the float layer `dequantized()` builds runs its own product."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expected last dimension {self.in_features}, got {tuple(x.shape)}")
        call = self._decoding_call(x)
        if call is not None:
            return call(x)
        flat = x.reshape(-1, self.in_features).to(self.factor_dtype)
        if needs_grad(flat) or not self._reads_codes(flat):
            return self.dequantized()(x)
        if 1 <= flat.shape[0] <= QUANTIZED_KERNEL_ROWS and kernels.few_tokens():
            codes = [(getattr(self, f"{name}_codes"), getattr(self, f"{name}_scales")) for name in QUANTIZED_FACTORS]
            out = ops.quantized_bitmask_linear(flat.to(torch.float32), *codes[:2], self.bias, self.sparse_bitmask,
                                               codes[2], self._nnz, self.bits, self.group_size).to(flat.dtype)
        else:
            out = dense_product(self, flat)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)  # the input's dtype, as the float layer's

    def _decoding_call(self, x: torch.Tensor) -> kernels.FewCall | None:
        if (self.sparse_format != "bitmask" or not self._decodes(x) or not kernels.few_tokens()
                or not 0 < x.numel() <= QUANTIZED_KERNEL_ROWS * self.in_features):
            return None
        tensors = self._tensors(_DECODING_TENSORS)
        return kernels.layer_call(self, tensors, lambda: kernels.quantized_few_call(
            tensors[:2], tensors[2:4], tensors[4], tensors[5], tensors[6:], self._nnz, self.bits, self.group_size,
            self.factor_dtype))

    def _reads_codes(self, *inputs: torch.Tensor) -> bool:
        """Whether the codes kernels run this layer: bitmask layout, CPU tensors, a build for this machine, scales
        in a dtype they read."""
        return (self.sparse_format == "bitmask" and kernels.can_run(self.sparse_bitmask, *inputs)
                and kernels.takes_factor_dtype(self.factor_dtype))

    def _sparse_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if not self._reads_codes():
            return super()._sparse_dense(dtype)
        return kernels.quantized_to_dense(self.sparse_bitmask, (self.sparse_values_codes, self.sparse_values_scales),
                                          self._nnz, self.bits, self.group_size, self.in_features,
                                          dtype or self.factor_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}"
