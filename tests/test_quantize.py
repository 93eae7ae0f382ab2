"""Group-wise integer codes for the factors (optimum_lrs.nn.quantize): packing, rounding, errors, byte counts."""

import pytest
import torch

from optimum_lrs.nn.quantize import (
    QUANT_BITS,
    check_bits,
    dequantize_groups,
    pack_codes,
    quantize_groups,
    unpack_codes,
)
from optimum_lrs.nn.quantized_linear import quantized_nbytes


@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("shape", [(6,), (3, 10), (2, 4, 8)])
def test_pack_unpack_round_trip_at_every_width(bits, shape):
    top = 2 ** (bits - 1) - 1
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(-top, top + 1, shape, generator=g, dtype=torch.int8)
    codes.view(-1)[:2] = torch.tensor([-top, top], dtype=torch.int8)  # both extremes
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_four_bit_codes_share_a_byte_low_nibble_first():
    packed = pack_codes(torch.tensor([-7, 7, 0, 1], dtype=torch.int8), 4)
    assert packed.tolist() == [(8 - 7) | (8 + 7) << 4, 8 | (8 + 1) << 4]


def test_odd_four_bit_rows_are_refused():
    with pytest.raises(ValueError, match="pack in pairs"):
        pack_codes(torch.zeros(3, 5, dtype=torch.int8), 4)


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_rounding_is_within_half_a_step_and_keeps_zeros_and_group_peaks(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 128, generator=g) * torch.logspace(-3, 2, 8).unsqueeze(1)  # groups of very different scales
    x[0, :32] = 0.0  # an all-zero group
    x[1, 5] = 0.0
    codes, scales = quantize_groups(x, bits, 32)
    assert codes.dtype == torch.int8 and scales.shape == (8, 4)
    assert int(codes.abs().max()) == 2 ** (bits - 1) - 1
    back = dequantize_groups(codes, scales)
    step = scales.repeat_interleave(32, dim=1)
    assert bool(((back - x).abs() <= step / 2 * (1 + 1e-6)).all())
    assert bool((back[0, :32] == 0).all()) and back[1, 5] == 0
    peaks = x.reshape(8, 4, 32).abs().argmax(-1)
    assert torch.allclose(back.reshape(8, 4, 32).gather(-1, peaks[..., None]),
                          x.reshape(8, 4, 32).gather(-1, peaks[..., None]), rtol=1e-6)


def rounded(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    return dequantize_groups(*quantize_groups(x, bits, group_size), x.dtype)


def test_eight_bits_are_closer_than_four():
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
    err = {bits: (rounded(x, bits, 64) - x).norm() / x.norm() for bits in QUANT_BITS}
    assert err[8] < err[4] / 8 and err[4] < 0.2


def test_rounding_keeps_the_dtype_and_is_deterministic():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    a, b = rounded(x, 4, 32), rounded(x.clone(), 4, 32)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_unsupported_bits_and_group_sizes_name_the_field_and_what_works():
    with pytest.raises(ValueError, match=r"bits in \(4, 8\), got 3"):
        check_bits(3, 64, {})
    with pytest.raises(ValueError, match=r"group_size=128 does not divide in_features=576.*64"):
        check_bits(4, 128, {"in_features": 576})
    for group_size in (0, 33, "64"):
        with pytest.raises(ValueError, match="positive even integer"):
            check_bits(4, group_size, {})


def test_byte_count_of_a_quantized_layer():
    # U 128 x 4 and V 4 x 64 in 4 bits: 768 codes; 100 values padded to 4 groups of 32: 128 codes -> 448 bytes;
    # scales: 4 columns x 4 groups + 4 rows x 2 groups + 4 value groups = 28, 2 bytes each; index bytes as given.
    assert quantized_nbytes(128, 64, 4, 100, index_bytes=1024, bits=4, group_size=32) == 448 + 56 + 1024
    assert quantized_nbytes(128, 64, 4, 100, index_bytes=0, bits=8, group_size=32) == 896 + 56
