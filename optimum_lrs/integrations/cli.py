"""Command line: `optimum-lrs compress | eval | report`, also reachable as `optimum-cli lrs ...`.

One implementation behind both entry points: `add_arguments` builds the sub-commands on any parser
(optimum-cli hands us its own) and `run` executes parsed arguments, returning the exit status:
0 success, 1 the work failed (bad model, impossible budget...), 2 bad arguments or unusable paths.
Heavy imports (torch, transformers) happen inside `run`, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

logger = logging.getLogger("optimum_lrs.integrations.cli")


class UsageError(Exception):
    """Arguments that parse but cannot be used (missing file, unwritable directory): exit status 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars, warnings and errors only")
    sub = parser.add_subparsers(dest="lrs_command", metavar="{compress,eval,report}")
    sub.required = True

    c = sub.add_parser("compress", help="compress a model and save it (optionally push it to the Hub)")
    c.add_argument("model", help="Hub id or local directory of the dense model (with --gguf-file: its directory)")
    # Options left out keep LowRankSparseConfig's defaults, so that the command line builds the model the
    # Python quick start builds.
    c.add_argument("--ratio", type=float, help="fraction of the linear layers' parameters to keep (default 0.5)")
    c.add_argument("--allocation", help="uniform (default), global_greedy or cap")
    c.add_argument("--activation-aware", action=argparse.BooleanOptionalAction,
                   help="activation-aware Stage 1 (default on; needs calibration text)")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any LowRankSparseConfig field, dotted into a nested config, VALUE as JSON or text "
                        "(repeatable): --set calibration.pipeline=sequential --set cap.steps=16 (a method's field chooses it)")
    c.add_argument("--gguf-file", help="GGUF file name inside MODEL's directory (dequantized, then compressed)")
    c.add_argument("--calibration", type=Path, help="calibration text: a .txt file or a .jsonl file with a 'text' field")
    c.add_argument("--seed", type=int, help="seed of every random choice (default 0)")
    c.add_argument("--base-model", help="Hub id of the dense model, for the model card")
    c.add_argument("--cache-dir", type=Path, help="Stage 1 cache: a rerun after an interruption resumes from it")
    c.add_argument("--device", default="cpu",
                   help="where the model is compressed: cpu (default) or cuda; under torchrun each rank takes cuda:LOCAL_RANK")
    c.add_argument("--output", type=Path, required=True, help="directory to write (must not exist, or --overwrite)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")
    c.add_argument("--push-to-hub", metavar="REPO", help="also push the compressed model and its card to this repo")

    e = sub.add_parser("eval", help="perplexity on a text file and zero-shot accuracy (lm-eval) of a saved model")
    e.add_argument("directory", type=Path, help="a saved model directory, compressed or dense")
    e.add_argument("--text", type=Path, help="perplexity on this text (e.g. WikiText-2 raw test)")
    e.add_argument("--seq-len", type=int, default=2048)
    e.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    e.add_argument("--tasks", help="zero-shot accuracy by lm-eval on these comma-separated tasks "
                                   "(piqa,winogrande,boolq,lambada_openai), read from --data-dir")
    e.add_argument("--data-dir", type=Path, help="directory of the tasks' local data (piqa/, winogrande/, boolq/, lambada/)")
    e.add_argument("--limit", type=int, help="evaluate only the first N items of each task")
    e.add_argument("--batch-size", type=int, default=1, help="lm-eval's batch size")
    e.add_argument("--record", action="store_true", help="store the results in a compressed model's config.json "
                                                          "and model card")

    r = sub.add_parser("report", help="per-layer allocation table and plot of a saved model")
    r.add_argument("directory", type=Path)
    r.add_argument("--plot", type=Path, help="where to write the plot (default DIRECTORY/allocation.png)")


def _calibration_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise UsageError(f"--calibration {path}: no such file")
    if path.suffix == ".jsonl":
        texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix == ".txt":
        texts = [path.read_text(encoding="utf-8")]
    else:
        raise UsageError(f"--calibration {path}: expected a .txt or .jsonl file")
    if not any(t.strip() for t in texts):
        raise UsageError(f"--calibration {path}: the file holds no text")
    return texts


def _compress(args: argparse.Namespace) -> int:
    from ..targets import is_hub_id
    from ..config import LowRankSparseConfig
    from ..distributed import Ranks, process_group_from_environment
    from ..io.model_card import push_to_hub
    from .optimum import LRSQuantizer, check_output_dir
    from ..streaming import compress_checkpoint

    if not Path(args.model).exists() and not is_hub_id(args.model):
        raise UsageError(f"{args.model}: neither a local directory nor a Hub model id")
    if args.gguf_file and not (Path(args.model) / args.gguf_file).is_file():
        raise UsageError(f"--gguf-file {args.gguf_file}: not found in {args.model}")
    texts = _calibration_texts(args.calibration) if args.calibration else None
    try:
        check_output_dir(args.output, args.overwrite)
        given = {"param_ratio": args.ratio, "allocation": args.allocation, "activation_aware": args.activation_aware,
                 "seed": args.seed, "calibration_data": texts, "cache_dir": str(args.cache_dir) if args.cache_dir else None}
        config = LowRankSparseConfig.from_overrides(args.overrides, **{k: v for k, v in given.items() if v is not None})
        config = config.with_inputs(base_model=args.base_model)  # for the model card, read from no model
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    with process_group_from_environment(args.device) as several:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if several and args.device == "cuda" else args.device
        if _streamable(args, config):  # one decoder block in memory at a time (docs/design.md, "Pipelines")
            compress_checkpoint(args.model, args.output, config, overwrite=args.overwrite, device=device)
            if not args.push_to_hub or not Ranks().writes:
                return 0
            quantizer = LRSQuantizer.from_pretrained(args.output)
            model = quantizer.model
        else:
            placement = {} if device == "cpu" else {"device_map": device}
            quantizer = LRSQuantizer.from_pretrained(args.model, file_name=args.gguf_file, **placement)
            model = quantizer.quantize(args.output, compression_config=config, overwrite=args.overwrite,
                                       repo_id=args.push_to_hub)
        if args.push_to_hub and Ranks().writes:
            push_to_hub(model, args.push_to_hub, tokenizer=quantizer.tokenizer)  # one commit, card included
    return 0


def _streamable(args: argparse.Namespace, config) -> bool:
    """A local safetensors checkpoint compressed with uniform allocation or CAP (its layer policies) streams from
    disk, block by block; GGUF files, Hub ids and the other allocations load the whole model."""
    from ..io.checkpoint import INDEX_NAME

    local = Path(args.model)
    return (not args.gguf_file and config.streams
            and any((local / name).is_file() for name in ("model.safetensors", INDEX_NAME)))


def _load_saved(directory: Path, compressed_only: bool = True):
    from transformers import AutoModelForCausalLM

    if not (directory / "config.json").is_file():
        raise UsageError(f"{directory}: no config.json; not a saved model directory")
    model = AutoModelForCausalLM.from_pretrained(directory)
    from ..io.model_card import lrs_config

    if compressed_only and lrs_config(model) is None:
        raise UsageError(f"{directory}: not an optimum_lrs compressed model")
    return model


def _eval_tasks(args: argparse.Namespace) -> list[str] | None:
    """--tasks as a list, checked with --data-dir and --limit before any model loads."""
    from ..zero_shot_tasks import check_tasks

    if args.tasks is None:
        if args.text is None:
            raise UsageError("give --text FILE (perplexity), --tasks LIST --data-dir DIR (zero-shot accuracy), or both")
        return None
    try:
        tasks = check_tasks([t.strip() for t in args.tasks.split(",") if t.strip()])
    except ValueError as exc:
        raise UsageError(f"--tasks: {exc}") from None
    if args.data_dir is None or not args.data_dir.is_dir():
        raise UsageError(f"--tasks needs --data-dir, the directory of the tasks' data (got {args.data_dir})")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    return tasks


def _eval(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from ..evaluation import perplexity, zero_shot
    from ..io.model_card import lrs_config, write_card

    if args.text is not None and not args.text.is_file():
        raise UsageError(f"--text {args.text}: no such file")
    tasks = _eval_tasks(args)
    model = _load_saved(args.directory, compressed_only=args.record)
    tokenizer = AutoTokenizer.from_pretrained(args.directory)
    result = {}
    if args.text is not None:
        value = perplexity(model, tokenizer, args.text.read_text(encoding="utf-8"), args.seq_len, args.max_windows)
        result.update({"perplexity": round(value, 4), "text": args.text.name, "seq_len": args.seq_len})
        if args.max_windows is not None:
            result["max_windows"] = args.max_windows
    if tasks is not None:
        accuracy = zero_shot(model, tokenizer, tasks, args.data_dir, args.limit, args.batch_size)
        for task, metrics in accuracy.items():
            result.update({f"{task}_{name}": round(value, 4) for name, value in metrics.items()
                           if name in ("acc", "acc_stderr")})
        if args.limit is not None:
            result["zero_shot_limit"] = args.limit
    print(json.dumps(result))
    if args.record:
        config_path = args.directory / "config.json"
        config = lrs_config(model)
        config.compressed = replace(config.compressed, evaluation={**(config.compressed.evaluation or {}), **result})
        saved = json.loads(config_path.read_text())
        saved["quantization_config"] = config.to_dict()  # format 1 is rewritten as today's format
        tmp = config_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, config_path)
        write_card(model, args.directory)
    return 0


def _report(args: argparse.Namespace) -> int:
    from ..io.model_card import allocation_table, plot_allocation

    model = _load_saved(args.directory)
    rows = allocation_table(model)
    print("| layer | shape | rank | nnz | kept / dense |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['out_features']}x{r['in_features']} | {r['rank']} | {r['nnz']} | {r['kept'] / r['dense']:.3f} |")
    kept, dense = sum(r["kept"] for r in rows), sum(r["dense"] for r in rows)
    print(f"\n{len(rows)} layers, kept {kept} of {dense} parameters ({kept / dense:.2%})")
    plot = plot_allocation(rows, args.plot or args.directory / "allocation.png")
    print(f"plot: {plot}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Execute parsed arguments; returns the exit status and reports failures on stderr."""
    quiet = args.quiet or int(os.environ.get("RANK", "0")) > 0  # under torchrun, rank 0 speaks for all
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if quiet:
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging

        from ..progress import set_progress_bars

        set_progress_bars(False)
        disable_progress_bars()
        hf_logging.disable_progress_bar()
    commands = {"compress": _compress, "eval": _eval, "report": _report}
    try:
        return commands[args.lrs_command](args)
    except UsageError as exc:
        print(f"optimum-lrs {args.lrs_command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError) as exc:
        print(f"optimum-lrs {args.lrs_command}: failed: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optimum-lrs", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
