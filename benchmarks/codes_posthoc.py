"""Variants of the quantized factors' codes tried post hoc on one float compressed model (research notes "Group
scales refit to the layer's outputs after the fitted codes" and "Input-channel scaling and 8-bit attention layers
before the fitted codes"). Each layer's input second moment H comes from the calibration windows through the float
model (the first position counted once per window token in attention layers, as the pipeline does); the codes are
fitted as `FactorQuantization(rounding="gptq", refit_scales=False)` fits them, then varied; perplexity on held-out C4 windows.

    python benchmarks/codes_posthoc.py MODEL_DIR --variant fitted --variant bits:v=8 --variant bits:k=8,v=8 \\
        --variant scales:30:0.003 --variant channels:0,0.25,0.5

MODEL_DIR: a float compressed model with its tokenizer (e.g. SmolLM2 compressed with `LowRankSparseConfig(
param_ratio=0.8)` and saved). Variants: `fitted` (the default codes), `bits:TYPE=B,...` (layer types by their
name's last part, e.g. `v` for v_proj or `down_proj`, at B bits, the rest at 4), `scales:STEPS:LR` (every group's
scale times (1 + d), d by Adam on the layer's output error over H), `cg:STEPS` (the scales refitted as
`FactorQuantization(refit_scales=True)` does, STEPS conjugate-gradient steps per half), `channels:ALPHAS` (AWQ's input-channel scaling
s = rms^alpha, the alpha of the list with the least output error per layer; the layer then runs on x / s).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from common import c4_texts, run_info
from transformers import AutoTokenizer

from optimum_lrs import LRSModelForCausalLM
from optimum_lrs.calibration import calibration_windows
from optimum_lrs.nn.linear import LowRankSparseLinear
from optimum_lrs.nn.quantize import unpack_codes
from optimum_lrs.nn.quantized_linear import QuantizedLowRankSparseLinear, quantized_nbytes

FACTORS = ("lowrank_u", "lowrank_v", "sparse_values")


def second_moments(model, layers: dict[str, LowRankSparseLinear], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    sums = dict.fromkeys(layers, 0)

    def hook(name):
        first = float(windows.shape[1]) if "self_attn" in name else 1.0

        def add(module, args):
            x = args[0].float()
            weight = torch.ones(x.shape[1])
            weight[0] = first
            x = (x * weight.sqrt()[None, :, None]).reshape(-1, x.shape[-1])
            sums[name] = sums[name] + x.T @ x
        return add

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    with torch.no_grad():
        for start in range(0, windows.shape[0], 4):
            model.model(windows[start:start + 4], use_cache=False)
    for handle in handles:
        handle.remove()
    return sums


def output_error(weight: torch.Tensor, approx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    error = weight - approx
    return ((error @ h) * error).sum() / ((weight @ h) * weight).sum()


def refit_scales(q: QuantizedLowRankSparseLinear, layer: LowRankSparseLinear, h: torch.Tensor, steps: int,
                 lr: float) -> None:
    """Every group's scale times (1 + d), d by Adam on the output error against the float layer; codes fixed."""
    weight, (rows, cols) = layer.dense_weight().detach().float(), layer.sparse_positions()
    codes = {k: unpack_codes(getattr(q, f"{k}_codes"), q.bits).float() for k in FACTORS}
    start = {k: getattr(q, f"{k}_scales").detach().float().clone() for k in FACTORS}
    change = {k: torch.zeros_like(v, requires_grad=True) for k, v in start.items()}
    h = h / h.diagonal().mean()

    def error():
        values = {k: (codes[k].reshape(*codes[k].shape[:-1], -1, q.group_size)
                      * (start[k] * (1 + change[k])).unsqueeze(-1)).reshape(codes[k].shape) for k in FACTORS}
        approx = (values["lowrank_u"].t() @ values["lowrank_v"]).index_put(
            (rows, cols), values["sparse_values"][: layer.nnz], accumulate=True)
        return output_error(weight, approx, h)

    optimizer = torch.optim.Adam(change.values(), lr=lr)
    best = (float(error()), {k: v.detach().clone() for k, v in change.items()})
    for _ in range(steps):
        optimizer.zero_grad()
        loss = error()
        loss.backward()
        if float(loss) < best[0]:
            best = (float(loss), {k: v.detach().clone() for k, v in change.items()})
        optimizer.step()
    with torch.no_grad():
        for k, d in best[1].items():
            getattr(q, f"{k}_scales").copy_(start[k] * (1 + d))


class ChannelScaled(torch.nn.Module):
    """A quantized layer of W diag(s), run on x / s."""

    def __init__(self, layer: QuantizedLowRankSparseLinear, scale: torch.Tensor):
        super().__init__()
        self.layer = layer
        self.register_buffer("inverse", 1.0 / scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x * self.inverse.to(x.dtype))


def channel_scaled(layer: LowRankSparseLinear, h: torch.Tensor, alphas: list[float]) -> torch.nn.Module:
    weight, rms = layer.dense_weight().detach().float(), h.diagonal().clamp_min(1e-12).sqrt()
    best = None
    for alpha in alphas:
        scale = rms.pow(alpha)
        scale = scale / (scale.max() * scale.min()).sqrt()
        scaled = copy.deepcopy(layer)
        with torch.no_grad():
            scaled.lowrank_v.mul_(scale[None, :])
            scaled.sparse_values.mul_(scale[scaled.sparse_positions()[1]])
        q = QuantizedLowRankSparseLinear.quantize(scaled, 4, 64, True, h / (scale[:, None] * scale[None, :]),
                                                  refit_scales=False)
        error = float(output_error(weight, q.dense_weight().float() / scale[None, :], h))
        if best is None or error < best[0]:
            best = (error, q if alpha == 0 else ChannelScaled(q, scale))
    return best[1]


def variant(base, layers, moments, spec: str) -> tuple[torch.nn.Module, float]:
    """The model with every compressed layer's codes made by `spec`, and its bytes over the dense bf16 bytes."""
    kind, _, arg = spec.partition(":")
    bits = dict(pair.split("=") for pair in arg.split(",")) if kind == "bits" else {}
    model, stored, dense = copy.deepcopy(base), 0, 0
    for name, layer in layers.items():
        h = moments[name]
        width = int(bits.get(name.split(".")[-1], bits.get(name.split(".")[-1][0], 4)))
        if kind == "channels":
            module = channel_scaled(layer, h, [float(a) for a in arg.split(",")])
        else:
            module = QuantizedLowRankSparseLinear.quantize(layer, width, 64, True, h, refit_scales=False)
            if kind == "cg":
                with torch.no_grad():
                    module.refit_scales(layer.dense_weight(), h, int(arg))
            if kind == "scales":
                steps, lr = arg.split(":")
                refit_scales(module, layer, h, int(steps), float(lr))
        model.set_submodule(name, module)
        stored += quantized_nbytes(layer.out_features, layer.in_features, layer.rank, layer.nnz,
                                   layer.out_features * layer.in_features // 8, width, 64)
        dense += 2 * layer.out_features * layer.in_features
    return model, stored / dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a float compressed model directory with its tokenizer")
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--windows", type=int, default=8, help="held-out C4 windows of 512 tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer, docs = AutoTokenizer.from_pretrained(args.model), c4_texts()
    base = LRSModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    layers = {n: m for n, m in base.named_modules() if isinstance(m, LowRankSparseLinear)}
    moments = second_moments(base, layers, calibration_windows(docs[:-100], tokenizer, 512, 16, 0))
    test = calibration_windows(docs[-100:], tokenizer, 512, args.windows, 0)
    results = []
    for spec in args.variant:
        start = time.perf_counter()
        model, ratio = variant(base, layers, moments, spec)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            ppl = float(model(test, labels=test, use_cache=False).loss.exp())
        print(f"{spec}: {ratio:.4f}x dense bf16 bytes, held-out C4 perplexity {ppl:.2f}, codes in {seconds:.0f} s",
              flush=True)
        results.append({"variant": spec, "byte_ratio": ratio, "c4_heldout_ppl": ppl, "seconds": seconds})
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"run": run_info(args.threads), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
