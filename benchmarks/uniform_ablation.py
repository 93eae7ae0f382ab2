"""Uniform allocation on SmolLM2-135M: which rank/sparse split and which sparse values, versus magnitude pruning.

Runs Stage 1 (RPCA) once for every targeted layer, then builds each variant from the same candidates
and scores it on the same WikiText-2 windows. Prints a markdown table.

    python benchmarks/uniform_ablation.py --ratio 0.5 --windows 16 --threads 2
"""

import argparse

from common import (
    add_eval_args,
    compressed_variant,
    header,
    magnitude_pruned,
    prepare,
    stage1,
)

from optimum_lrs import LowRankSparseConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.4, 0.7])
    add_eval_args(parser)
    args = parser.parse_args()
    model, tokenizer, ppl = prepare(args)

    print(header(args) + f"# param_ratio {args.ratio}\n")
    rows = [("dense", "-", "-", ppl(model))]
    targets, candidates, rpca_seconds = stage1(model, LowRankSparseConfig(param_ratio=args.ratio, rpca_max_rank=None))
    budget = round(args.ratio * sum(c.dense_params for c in candidates))
    rows.append(("magnitude pruning, per matrix", "-", "-", ppl(magnitude_pruned(model, targets, args.ratio))))
    for fraction in args.fractions:
        for values in ("rpca", "residual"):
            cfg = LowRankSparseConfig(param_ratio=args.ratio, lowrank_fraction=fraction, sparse_values=values)
            variant, _, _ = compressed_variant(model, targets, candidates, cfg, budget)
            rows.append(("uniform low-rank + sparse", fraction, values, ppl(variant)))
    print("| method | lowrank_fraction | sparse_values | perplexity |\n|---|---|---|---|")
    for method, fraction, values, value in rows:
        print(f"| {method} | {fraction} | {values} | {value:.2f} |")
    iters = [c.rpca.iterations for c in candidates]
    print(f"\nRPCA of {len(candidates)} matrices: {rpca_seconds:.0f} s, iterations {min(iters)}-{max(iters)}, "
          f"max residual {max(c.rpca.residual for c in candidates):.1e}")


if __name__ == "__main__":
    main()
