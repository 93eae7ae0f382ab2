"""`CapAllocation`: the settings of CAP's policy-gradient allocation (`allocation="cap"` is its defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from ... import checks
from ..base import AllocationConfig

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
            projection onto the budget, global ranking by s at the end); on SmolLM2 it moved 0.01% of the
            budget (docs/research-notes.md).
        lr: step size; None: the paper's 0.05 for `"candidate"`, 0.02 log-count units for the count policies
            (on SmolLM2 at 50% 0.05 drifted above uniform, docs/research-notes.md).
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
