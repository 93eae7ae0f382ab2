"""Group-wise symmetric integer codes for a compressed layer's factors (U, V and S's values), as GPTQ and AWQ
checkpoints store weights: `bits` (4 or 8) per value and one scale per group of `group_size` consecutive values.

Symmetric, without zero points: U and V are balanced singular factors and S holds residual outliers, all
centred on zero, so a zero point would cost bytes for nothing. A group's scale is its largest magnitude over
`2^(bits-1) - 1`, so codes lie in [-(2^(bits-1) - 1), 2^(bits-1) - 1] and zero stays exactly zero. Packed,
codes are offset to unsigned (`+ 2^(bits-1)`); at 4 bits two share a byte, the even position in the low nibble.

Groups run along a dimension every compressed layer shares: U's columns (groups of `out_features` entries),
V's rows (`in_features`) and S's values in their row-major order (one stream, its last group zero-padded). The
ranks differ layer by layer, so groups never run along them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import checks

QUANT_BITS = (4, 8)
# How quantized factors get their codes (FactorQuantization.rounding).
ROUNDINGS = ("gptq", "nearest")


@dataclass
class FactorQuantization:
    """U, V and S's values stored as `bits`-bit integer codes (4 or 8) with one scale per `group_size` values,
    once each layer is final (`nn.quantize`, `QuantizedLowRankSparseLinear`). The group size must divide every
    compressed layer's input and output width (64 for SmolLM2's 576).

    `rounding`: `"gptq"` fits the codes to each layer's calibration inputs (`nn.gptq`: GPTQ's sweep over V, U,
    then S's values with their positions fixed; the run then calibrates, as activation-aware compression
    does); `"nearest"` rounds every factor to nearest. `error_feedback` (rounding to
    nearest): round U and V first and add what that changed in U V at S's positions to S's values before
    rounding them. `refit_scales` (fitted codes): once the codes are chosen, refit every group's scale to the
    layer's outputs (`nn.scale_fit`; no bytes change). `match_scales`: where block matching runs
    (`RefitConfig.block_matching_steps`), match each block again once its layers are stored as codes, on the
    groups' scales with the codes fixed (`block_matching`), in half the steps
    (`LowRankSparseConfig.scale_matching_steps`)."""

    bits: int = 4
    group_size: int = 64
    rounding: str = "gptq"
    error_feedback: bool = True
    refit_scales: bool = True
    match_scales: bool = True

    def __post_init__(self) -> None:
        self.error_feedback = checks.flag("FactorQuantization", "error_feedback", self.error_feedback)
        self.refit_scales = checks.flag("FactorQuantization", "refit_scales", self.refit_scales)
        self.match_scales = checks.flag("FactorQuantization", "match_scales", self.match_scales)
        checks.choice("FactorQuantization", "rounding", self.rounding, ROUNDINGS)

        if self.bits not in QUANT_BITS:
            checks.fail("FactorQuantization", "bits", f"one of {QUANT_BITS}", self.bits)
        self.group_size = checks.integer("FactorQuantization", "group_size", self.group_size, 2)
        if self.group_size % 2:
            checks.fail("FactorQuantization", "group_size", "an even integer (4-bit codes pack in pairs)",
                        self.group_size)


def check_bits(bits: int, group_size: int, dims: dict[str, int]) -> None:
    """A clear error for bits the codes do not support, or a group size that does not divide the dimensions
    `dims` (name -> size) whose groups it cuts."""
    if bits not in QUANT_BITS:
        raise ValueError(f"quantized factors take bits in {QUANT_BITS}, got {bits!r}")
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be a positive even integer (4-bit codes pack in pairs), got {group_size!r}")
    for name, size in dims.items():
        if size % group_size:
            divisors = [g for g in (32, 64, 128, 256) if size % g == 0]
            raise ValueError(f"group_size={group_size} does not divide {name}={size}; groups must tile it "
                             f"(sizes that do: {divisors or 'none of 32, 64, 128, 256'})")


def quantize_groups(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int8, x's shape) and scales (float32, (..., n / group_size)) of `x` (..., n), n a multiple of
    group_size, rounded to nearest: x ~ codes * scales repeated over each group."""
    check_bits(bits, group_size, {"the last dimension": x.shape[-1]})
    top = 2 ** (bits - 1) - 1
    groups = x.detach().float().reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    scales = groups.abs().amax(-1) / top
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(groups / safe.unsqueeze(-1)).clamp_(-top, top).to(torch.int8)
    return codes.reshape(x.shape), scales


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes * scales, each scale repeated over its group of the last dimension."""
    if not codes.numel():
        return torch.empty(codes.shape, dtype=dtype, device=codes.device)
    group_size = codes.shape[-1] // scales.shape[-1]
    groups = codes.reshape(*codes.shape[:-1], scales.shape[-1], group_size).float() * scales.float().unsqueeze(-1)
    return groups.reshape(codes.shape).to(dtype)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes (..., n) as uint8 (..., n * bits / 8): offset to unsigned; at 4 bits, two per byte, the even
    position in the low nibble (n must be even)."""
    unsigned = (codes.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8)
    if bits == 8:
        return unsigned
    if codes.shape[-1] % 2:
        raise ValueError(f"4-bit codes pack in pairs: the last dimension must be even, got {codes.shape[-1]}")
    pairs = unsigned.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack_codes`: int8 codes."""
    if bits == 8:
        unsigned = packed
    else:
        unsigned = torch.stack([packed & 0x0F, packed >> 4], -1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return (unsigned.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)

