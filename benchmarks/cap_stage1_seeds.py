"""CAP at one budget from a capped (the default, `rpca_max_rank="auto"`) and an uncapped Stage 1, per seed:
whole `compress_` time and WikiText-2 perplexity. One run per seed is not enough here: the seed (calibration
windows and CAP's samples) moves CAP's perplexity by several percent, so a Stage 1 choice is judged on the mean.

    python benchmarks/cap_stage1_seeds.py --ratio 0.5 --seeds 0 1 2 --windows 16 --threads 2
"""

import argparse
import copy
import statistics
import time

from common import add_eval_args, c4_texts, header, prepare

from optimum_lrs import LowRankSparseConfig, compress_

STAGE1 = {"capped": {}, "uncapped": {"rpca_max_rank": None}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add_eval_args(parser)
    args = parser.parse_args()
    dense, tokenizer, ppl = prepare(args)
    print(header(args))
    results = {name: [] for name in STAGE1}
    print("| seed | Stage 1 | compress s | perplexity |\n|---|---|---|---|")
    for seed in args.seeds:
        for name, settings in STAGE1.items():
            model = copy.deepcopy(dense)
            config = LowRankSparseConfig(param_ratio=args.ratio, allocation="cap", calibration_data=c4_texts(),
                                         tokenizer=tokenizer, seed=seed, **settings)
            start = time.perf_counter()
            compress_(model, config)
            seconds = time.perf_counter() - start
            results[name].append(ppl(model))
            print(f"| {seed} | {name} | {seconds:.0f} | {results[name][-1]:.2f} |", flush=True)
            del model
    for name, values in results.items():
        print(f"{name}: mean perplexity {statistics.mean(values):.2f} over seeds {args.seeds}")


if __name__ == "__main__":
    main()
