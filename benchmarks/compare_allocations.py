"""Allocation methods side by side on SmolLM2-135M: uniform, global_greedy and CAP from the same RPCA candidates.

Calibration: windows of the C4 sample in ../shared/data (CAP only); evaluation: WikiText-2 test.

    python benchmarks/compare_allocations.py --ratios 0.5 --windows 16 --threads 2
"""

import argparse
import time

from common import (
    add_eval_args,
    c4_texts,
    compressed_variant,
    header,
    magnitude_pruned,
    prepare,
    stage1,
)

from optimum_lrs import LowRankSparseConfig
from optimum_lrs.calibration import calibration_windows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5])
    parser.add_argument("--methods", nargs="+", default=["uniform", "global_greedy", "cap"])
    add_eval_args(parser)
    args = parser.parse_args()
    model, tokenizer, ppl = prepare(args)

    defaults = LowRankSparseConfig(rpca_max_rank=None)  # one Stage 1 for every method and ratio: full pools
    calibration = calibration_windows(
        c4_texts(), tokenizer, defaults.calibration_seq_len, defaults.calibration_num_samples, defaults.seed
    )
    print(header(args) + f"# calibration: {tuple(calibration.shape)} C4 windows (CAP only); default configs\n")
    targets, candidates, rpca_seconds = stage1(model, defaults)
    rows = [("dense", "-", ppl(model), "-")]
    for ratio in args.ratios:
        budget = round(ratio * sum(c.dense_params for c in candidates))
        start = time.perf_counter()
        rows.append(("magnitude pruning, per matrix", ratio, ppl(magnitude_pruned(model, targets, ratio)),
                     f"{time.perf_counter() - start:.1f}"))
        for method in args.methods:
            cfg = LowRankSparseConfig(param_ratio=ratio, allocation=method)
            variant, seconds, problem = compressed_variant(model, targets, candidates, cfg, budget, calibration)
            rows.append((method, ratio, ppl(variant), f"{seconds:.1f}"))
            if "cap_loss_history" in problem.extras:
                print(f"CAP at {ratio}: mean sampled loss per step {[round(x, 3) for x in problem.extras['cap_loss_history']]}")
            del variant
    print("\n| method | param_ratio | perplexity | allocation seconds |\n|---|---|---|---|")
    for method, ratio, value, seconds in rows:
        print(f"| {method} | {ratio} | {value:.2f} | {seconds} |")
    print(f"\nStage 1 (RPCA, shared by all methods): {rpca_seconds:.0f} s for {len(candidates)} matrices")


if __name__ == "__main__":
    main()
