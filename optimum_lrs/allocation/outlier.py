"""Outlier-weighted block shares (OWL, Yin et al. 2023): blocks whose weights meet more activation outliers keep more.

A block's outlier ratio is the fraction of its weights whose |W_ij| * rms(x_j) exceeds `OUTLIER_THRESHOLD` times
the block's mean of that product, on the dense model's calibration inputs. The ratios, mapped linearly onto
[0, 2 spread] and shifted so that their parameter-weighted mean is the target ratio, give each block its kept
fraction; inside a block every matrix keeps that fraction.
"""

from __future__ import annotations

import torch
from torch import nn

from ..activations import input_rms

OUTLIER_THRESHOLD = 5.0  # OWL's M


@torch.no_grad()
def outlier_ratios(model: nn.Module, targets: dict[str, nn.Linear], blocks: list[str], windows: torch.Tensor
                   ) -> dict[str, float]:
    """Each block's fraction of weights whose |W_ij| rms(x_j) exceeds OUTLIER_THRESHOLD times the block's mean."""
    rms = input_rms(model, targets, windows)
    ratios = {}
    for prefix in blocks:
        layers = {n: m for n, m in targets.items() if n.startswith(f"{prefix}.")}
        metric = {n: m.weight.detach().float().abs() * rms[n] for n, m in layers.items()}
        count = sum(x.numel() for x in metric.values())
        mean = sum(x.double().sum().item() for x in metric.values()) / count
        ratios[prefix] = sum(int((x > OUTLIER_THRESHOLD * mean).sum()) for x in metric.values()) / count
    return ratios


def outlier_shares(sizes: dict[str, int], block_of: dict[str, str], ratios: dict[str, float], budget: int,
                   spread: float) -> dict[str, int]:
    """Per matrix (`sizes`: dense parameter counts, in layer order), its share of `budget`: its block's kept
    fraction, OWL's outlier ratio spread over [0, 2 spread] and centred on the budget's ratio."""
    low, high = min(ratios.values()), max(ratios.values())
    lifted = {b: 2 * spread * (r - low) / (high - low) if high > low else 0.0 for b, r in ratios.items()}
    total = sum(sizes.values())
    mean = sum(lifted[block_of[n]] * s for n, s in sizes.items()) / total
    fractions = {n: min(1.0, max(0.0, budget / total + lifted[block_of[n]] - mean)) for n in sizes}
    shares = {n: int(fractions[n] * s) for n, s in sizes.items()}
    missing = budget - sum(shares.values())
    for n in sizes:  # the rounding (and any clipping) remainder, where there is room
        give = max(-shares[n], min(sizes[n] - shares[n], missing))
        shares[n] += give
        missing -= give
        if not missing:
            break
    return shares
