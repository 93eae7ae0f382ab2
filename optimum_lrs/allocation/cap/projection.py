"""The exact budget projection of the per-candidate policy: s = clip(z - nu c, 0, 1) with c^T s = K."""

from __future__ import annotations

import torch


class Ramp:
    """Values sorted ascending and prefix-summed, so that sum(clip(v - t, 0, 1)) costs O(log n) for any t."""

    def __init__(self, values: torch.Tensor):
        self.v = values.float().flatten().sort().values
        self.prefix = torch.cat([self.v.new_zeros(1, dtype=torch.float64), self.v.double().cumsum(0)])

    def __len__(self) -> int:
        return self.v.numel()

    def expected(self, t: float) -> float:
        # [lo, hi): the sorted positions with 0 < v - t < 1 (below lo: 0, from hi on: 1)
        lo, hi = torch.searchsorted(self.v, torch.tensor([t, 1 + t], dtype=self.v.dtype), right=True).tolist()
        return (self.prefix[hi] - self.prefix[lo]).item() - t * (hi - lo) + (len(self) - hi)


def solve_shift(ramps: list[Ramp], costs: list[float], slopes: list[float], budget: float, iters: int = 100) -> float:
    """The nu with sum_g costs[g] * ramps[g].expected(nu * slopes[g]) = budget, by bisection."""
    total = sum(c * len(r) for r, c in zip(ramps, costs))
    if not 0 <= budget <= total:
        raise ValueError(f"budget {budget} outside [0, {total}]")
    groups = [(r, c, d) for r, c, d in zip(ramps, costs, slopes) if len(r)]
    if not groups:
        return 0.0
    # The spent cost falls as nu grows: at `lo` every value is clipped to 1, at `hi` every value to 0.
    lo = min((r.v[0].item() - 1) / d for r, _, d in groups)
    hi = max(r.v[-1].item() / d for r, _, d in groups)
    for _ in range(iters):
        mid = (lo + hi) / 2
        spent = sum(c * r.expected(mid * d) for r, c, d in groups)
        lo, hi = (mid, hi) if spent > budget else (lo, mid)
    return hi


def project_to_budget(z: list[torch.Tensor], costs: list[float], budget: float) -> float:
    """In place: s = clip(z - nu c, 0, 1) with nu (either sign) such that sum c s = budget. Returns nu.

    `z[i]` holds candidates that all cost `costs[i]`; the budget must lie in [0, sum of all costs].
    """
    nu = solve_shift([Ramp(t) for t in z], costs, costs, budget)
    for t, c in zip(z, costs):
        t.copy_((t.float() - nu * c).clamp_(0, 1))
    return nu


