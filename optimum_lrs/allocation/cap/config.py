"""`CapAllocation`: the settings of CAP's policy-gradient allocation (`allocation="cap"` is its defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ... import checks
from ..base import AllocationConfig

if TYPE_CHECKING:
    from ...config import RefitConfig

POLICIES = ("layer", "layer_type", "candidate")
CANDIDATES = ("refit", "rpca")


@dataclass
class CapAllocation(AllocationConfig):
    """CAP (arXiv 2505.03801, Stage 2): a distribution over what every layer keeps, moved by REINFORCE on the
    causal-LM loss of the masked model on calibration windows, held to the budget after every step.

    Args:
        steps, samples, batch_size: policy-gradient steps, masks sampled per step (all scored on the step's
            batch) and calibration windows per loss evaluation.
        policy: what the distribution is over. `"layer"` (default): each layer's kept share, log-normal around a
            mean that starts at the uniform allocation (`sigma` its spread in log-count units, uniform's
            rank/sparse split kept); a sample keeps each layer's best candidates, samples come in antithetic
            pairs, and each step moves the means by `lr` (RMS) along the REINFORCE estimate. `"layer_type"`: the
            same with a layer's rank and sparse count free apart. `"candidate"`: the paper's one Bernoulli
            probability per candidate as METHOD.md reads it (magnitude-informed start within each candidate
            type, moving-average baseline over a window of 5, s <- s - lr (L - b) (m - s) / (s (1 - s)), exact
            projection onto the budget, global ranking by s at the end), which hardly moves budget in a few
            dozen forwards (docs/design.md, "CAP").
        lr: step size; None: the paper's 0.05 for `"candidate"`, 0.02 log-count units for the count policies
            (docs/design.md says why).
        sigma: spread of the count policies' sampled counts (0.1: about +-10% per layer).
        candidates (count policies, where the final layers are refit): what a sampled count keeps. `"refit"`
            (default): prefixes of each layer refit at the uniform counts, as the final layer would be, so
            that the loss CAP optimises is that of the model it builds; `"rpca"`: Stage 1's RPCA candidates.
        refine_iterations (with `"refit"` candidates): how many of `RefitConfig.iterations` run at the
            allocated counts, continuing the candidates' refit (which runs the others at the uniform counts).
            None: 5, or all of them where there are fewer.
    """

    name = "cap"
    loss_driven = True
    steps: int = 8
    samples: int = 4
    batch_size: int = 1
    policy: str = "layer"
    lr: float | None = None
    sigma: float = 0.1
    candidates: str = "refit"
    refine_iterations: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        self.steps = checks.integer(owner, "steps", self.steps, 0)
        self.samples = checks.integer(owner, "samples", self.samples, 1)
        self.batch_size = checks.integer(owner, "batch_size", self.batch_size, 1)
        self.policy = checks.choice(owner, "policy", self.policy, POLICIES)
        if self.policy != "candidate" and self.samples % 2:
            checks.fail(owner, "samples", f"even with policy={self.policy!r} (its samples come in antithetic pairs)",
                        self.samples)
        if self.lr is None:
            self.lr = 0.05 if self.policy == "candidate" else 0.02
        self.lr = checks.real(owner, "lr", self.lr, 0.0, float("inf"), high_open=True)
        self.sigma = checks.real(owner, "sigma", self.sigma, 0.0, float("inf"), low_open=True, high_open=True)
        self.candidates = checks.choice(owner, "candidates", self.candidates, CANDIDATES)
        if self.refine_iterations is not None:
            self.refine_iterations = checks.integer(owner, "refine_iterations", self.refine_iterations, 0)

    def resolve(self, refit: RefitConfig) -> None:
        if self.refine_iterations is None:
            self.refine_iterations = min(5, refit.iterations)
        if self.refine_iterations > refit.iterations:
            checks.fail(type(self).__name__, "refine_iterations", f"at most RefitConfig.iterations ({refit.iterations})",
                        self.refine_iterations)

    def refits_candidates(self, refit: RefitConfig) -> bool:
        """True when samples keep prefixes of each layer refit at the uniform counts (`candidates="refit"`), which
        happens where the final layers are refit too, with the count policies."""
        return self.candidates == "refit" and self.policy != "candidate" and refit.selection != "allocation"

    def reads_uniform_rank(self, refit: RefitConfig) -> bool:
        return self.refits_candidates(refit)

    def streams(self, refit: RefitConfig) -> bool:
        return self.refits_candidates(refit)  # the pools are then small enough to keep on disk (cap/streamed.py)
