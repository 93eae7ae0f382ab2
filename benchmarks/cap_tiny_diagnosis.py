"""Does CAP's policy-gradient step improve on its own initialisation? A small, fast, loss-sensitive test bed.

A random 2-layer llama (the tests' tiny_llama) is first trained for 300 AdamW steps on WikiText-2 bytes,
so that its loss depends on its weights; then it is compressed by every allocation method and scored on
held-out windows. `cap` with `cap_steps=0` is CAP's initialisation alone (the uniform allocation).

    python benchmarks/cap_tiny_diagnosis.py --threads 2 --ratios 0.5 0.3
"""

import argparse
import copy
import sys
from pathlib import Path

import torch
from common import wikitext

from optimum_lrs import LowRankSparseConfig, compress_

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import ByteTokenizer, tiny_llama  # noqa: E402

VARIANTS = [
    dict(allocation="uniform"),
    dict(allocation="global_greedy"),
    dict(allocation="cap", cap_steps=0),
    dict(allocation="cap", cap_policy="candidate", cap_steps=30, cap_samples=6),
    dict(allocation="cap", cap_policy="candidate", cap_steps=30, cap_samples=6, cap_normalize_advantage=True),
    dict(allocation="cap", cap_policy="candidate", cap_steps=30, cap_samples=6, cap_gradient="logit",
         cap_normalize_advantage=True, cap_lr=1.0),
    dict(allocation="cap", cap_policy="layer_type", cap_steps=30, cap_samples=6),
    dict(allocation="cap", cap_steps=8, cap_samples=4),
    dict(allocation="cap", cap_steps=30, cap_samples=6),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ids = ByteTokenizer()(wikitext()[:200_000]).input_ids[0]

    def windows(n, length, seed):
        starts = torch.randint(0, ids.numel() - length, (n,), generator=torch.Generator().manual_seed(seed))
        return torch.stack([ids[s : s + length] for s in starts])

    model = tiny_llama().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(300):
        batch = windows(16, 64, step)
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    calibration, held_out = windows(16, 64, 10_000), windows(32, 64, 20_000)

    def loss(m):
        with torch.no_grad():
            return m(held_out, labels=held_out).loss.item()

    print(f"dense held-out loss {loss(model):.4f}\n")
    print("| variant | " + " | ".join(f"param_ratio {r}" for r in args.ratios) + " |\n|---|" + "---|" * len(args.ratios))
    for kw in VARIANTS:
        losses = [loss(compress_(copy.deepcopy(model), LowRankSparseConfig(
            param_ratio=r, calibration_data=calibration, cap_batch_size=4, **kw))) for r in args.ratios]
        print(f"| {', '.join(f'{k}={v}' for k, v in kw.items())} | " + " | ".join(f"{x:.4f}" for x in losses) + " |", flush=True)


if __name__ == "__main__":
    main()
