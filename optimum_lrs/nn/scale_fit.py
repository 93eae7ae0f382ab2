"""Group scales refitted to the layer's outputs once the codes are fixed.

GPTQ's sweep (`nn.gptq`) fixes each group's scale before rounding (its largest magnitude over the top code);
once the codes are chosen, the scales that make the outputs closest to the float layer's are different ones. With
the codes fixed, W~ = U~ V~ + S~ is linear in V's and S's scales for a given U~ (and in U's and S's for a given
V~), so each half is a linear least-squares problem on the outputs' error tr((W - W~) H (W - W~)^T): solved here by
a few conjugate-gradient steps, Jacobi-preconditioned, starting from the sweep's scales. Each step costs one
product of an (out, in) matrix with H, as one column sweep does. The scales are stored anyway: no bytes change.
"""

from __future__ import annotations

import torch

# Conjugate-gradient steps per half (V and S's scales, then U and S's).
STEPS = 4

Vector = tuple[torch.Tensor, ...]


def _expand(scales: torch.Tensor, group: int) -> torch.Tensor:
    return scales.repeat_interleave(group, -1)


def _group_sum(x: torch.Tensor, group: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // group, group).sum(-1)


def _dot(a: Vector, b: Vector) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


class _Half:
    """W~ as a linear map of the scales of one low-rank factor (`side`: "u" or "v", the other factor fixed; None
    where the rank is 0) and of S's values (None where the layer has none), its adjoint, and the diagonal of the
    normal matrix that preconditions the solve."""

    def __init__(self, side: str | None, codes: dict[str, torch.Tensor], values: dict[str, torch.Tensor],
                 h: torch.Tensor, positions: tuple[torch.Tensor, torch.Tensor], shape: tuple[int, int], group: int):
        self.side, self.codes, self.h, self.positions, self.shape, self.group = side, codes, h, positions, shape, group
        self.nnz = positions[0].numel()
        self.fixed = values["v" if side == "u" else "u"] if side else None  # (rank, in) V~ or (rank, out) U~^T
        diagonal = []
        if side == "v":  # a group of V's row r: U~'s column r times that group of V's codes
            n = shape[1] // group
            blocks = h.reshape(n, group, n, group).diagonal(0, 0, 2)  # (group, group, n): H's diagonal blocks
            cv = codes["v"].reshape(-1, n, group)
            diagonal.append(torch.einsum("rja,abj,rjb->rj", cv, blocks, cv) * self.fixed.square().sum(1, keepdim=True))
        elif side == "u":  # a group of U's column r: those codes times V~'s row r
            vhv = ((self.fixed @ h) * self.fixed).sum(1, keepdim=True)
            diagonal.append(_group_sum(codes["u"].square(), group) * vhv)
        if self.nnz:  # H's off-diagonal within a group left out: a preconditioner only
            entries = codes["s"][: self.nnz].square() * h.diagonal()[positions[1]]
            diagonal.append(_group_sum(torch.nn.functional.pad(entries, (0, codes["s"].numel() - self.nnz)), group))
        self.diagonal = tuple(diagonal)

    def forward(self, x: Vector) -> torch.Tensor:
        """The (out, in) matrix these scales make (the other factor's part left out)."""
        out = torch.zeros(self.shape, device=self.h.device)
        parts = list(x)
        if self.side == "v":
            out += self.fixed.t() @ (self.codes["v"] * _expand(parts.pop(0), self.group))
        elif self.side == "u":
            out += (self.codes["u"] * _expand(parts.pop(0), self.group)).t() @ self.fixed
        if self.nnz:
            values = (self.codes["s"] * _expand(parts.pop(0), self.group))[: self.nnz]
            out.index_put_(self.positions, values, accumulate=True)
        return out

    def adjoint(self, g: torch.Tensor) -> Vector:
        """The gradient of <forward(x), g> in x: each group's codes against g's entries they reach."""
        parts = []
        if self.side == "v":
            parts.append(_group_sum(self.codes["v"] * (self.fixed @ g), self.group))
        elif self.side == "u":
            parts.append(_group_sum(self.codes["u"] * (self.fixed @ g.t()), self.group))
        if self.nnz:
            entries = torch.nn.functional.pad(g[self.positions], (0, self.codes["s"].numel() - self.nnz))
            parts.append(_group_sum(self.codes["s"] * entries, self.group))
        return tuple(parts)

    def _precondition(self, residual: Vector) -> Vector:
        """The residual over the normal matrix's diagonal (zero for an all-zero group, whose scale stays)."""
        return tuple(torch.where(d > 0, r / d.clamp_min(1e-30), 0) for r, d in zip(residual, self.diagonal))

    def solve(self, start: Vector, target: torch.Tensor, steps: int) -> Vector:
        """Scales near `start` minimising tr((target - forward(x)) H (...)^T), by preconditioned conjugate
        gradients on the normal equations (each step lowers the error: the objective is a convex quadratic)."""
        x = tuple(s.clone() for s in start)
        residual = self.adjoint((target - self.forward(x)) @ self.h)
        z = self._precondition(residual)
        direction, rz = z, _dot(residual, z)
        for _ in range(steps):
            step = self.adjoint(self.forward(direction) @ self.h)  # the normal matrix times the direction
            curvature = _dot(direction, step)
            if not curvature > 0:
                break
            alpha = rz / curvature
            x = tuple(a + alpha * p for a, p in zip(x, direction))
            residual = tuple(r - alpha * q for r, q in zip(residual, step))
            z = self._precondition(residual)
            rz, previous = _dot(residual, z), rz
            direction = tuple(a + (rz / previous) * p for a, p in zip(z, direction))
        return x


def fit_scales(weight: torch.Tensor, second_moment: torch.Tensor, codes: dict[str, torch.Tensor],
               scales: dict[str, torch.Tensor], positions: tuple[torch.Tensor, torch.Tensor], group: int,
               steps: int = STEPS) -> dict[str, torch.Tensor]:
    """Scales (float32, the shapes of `scales`) for the fixed `codes` that bring W~ = U~ V~ + S~ closer to
    `weight` (out, in) on inputs of second moment H: V's and S's first, then U's and S's.

    `codes` and `scales` hold the stored layouts by factor, "u" (rank, out) for U transposed, "v" (rank, in) and
    "s" (S's values in row-major order, zero-padded to whole groups), with float codes; `positions` are S's rows
    and columns in that order. Scales of all-zero groups are left as they are."""
    h = second_moment.float() / second_moment.diagonal().float().mean().clamp_min(1e-30)
    weight = weight.float()
    scales = {k: v.float() for k, v in scales.items()}
    rank, nnz = codes["u"].shape[0], positions[0].numel()
    for side in (("v", "u") if rank else (None,)):
        values = {k: codes[k] * _expand(scales[k], group) for k in codes}  # the other factor at its latest scales
        half = _Half(side, codes, values, h, positions, tuple(weight.shape), group)
        names = ([side] if side else []) + (["s"] if nnz else [])
        if not names:
            break
        solved = half.solve(tuple(scales[k] for k in names), weight, steps)
        scales.update(zip(names, solved))
    return scales
