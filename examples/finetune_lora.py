"""LoRA fine-tuning of a compressed SmolLM2 with PEFT: the factor tensors stay frozen, the loss goes down.

    python examples/compress_smollm2.py --output smollm2-lrs      # or any optimum_lrs checkpoint
    python examples/finetune_lora.py --model smollm2-lrs --steps 200

Trains on the C4 sample in ../shared/data (or --train FILE), reports held-out WikiText-2 perplexity
before and after, saves the adapter, and merges it (the merged layers stay compressed: the LoRA
factors are appended to the low-rank factors).
"""

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import optimum_lrs  # noqa: F401  (registers the optimum_lrs model type)
from optimum_lrs import LowRankSparseLoraConfig, lora_target_modules
from optimum_lrs.calibration import calibration_windows
from optimum_lrs.evaluation import perplexity

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a saved optimum_lrs checkpoint with its tokenizer")
    parser.add_argument("--train", type=Path, default=SHARED / "c4_calibration.jsonl")
    parser.add_argument("--eval-text", type=Path, default=SHARED / "wikitext2_test_joined.txt")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("smollm2-lrs-lora"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    texts = [json.loads(line)["text"] for line in args.train.read_text().splitlines()]
    train = calibration_windows(texts, tokenizer, args.seq_len, args.steps * args.batch_size, seed=0)
    eval_text = args.eval_text.read_text()
    before = perplexity(model, tokenizer, eval_text, 512, args.eval_windows)
    print(f"held-out perplexity before: {before:.2f}")

    model = get_peft_model(model, LowRankSparseLoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                          target_modules=lora_target_modules(model)))
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    start, window = time.perf_counter(), []
    for step in range(args.steps):
        batch = train[step * args.batch_size:(step + 1) * args.batch_size]
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        window.append(loss.item())
        if (step + 1) % 20 == 0:
            print(f"step {step + 1:4d}  mean loss of the last 20 steps {sum(window) / len(window):.4f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
            window = []
    model.eval()
    after = perplexity(model, tokenizer, eval_text, 512, args.eval_windows)
    print(f"held-out perplexity after {args.steps} steps: {after:.2f} (before {before:.2f})")

    model.save_pretrained(args.output / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(args.output / "merged")
    tokenizer.save_pretrained(args.output / "merged")
    print(f"adapter saved to {args.output / 'adapter'}, merged compressed model to {args.output / 'merged'}")


if __name__ == "__main__":
    main()
