"""lm-eval's own command line with optimum_lrs imported first:

    python -m optimum_lrs.integrations.lm_eval_cli --model hf --model_args pretrained=DIR \\
        --tasks piqa,winogrande --local-data ../shared/data/zeroshot

lm-eval's `lm_eval` command does not import third-party quantizers, so a compressed checkpoint's
`quant_method: optimum_lrs` is unknown to it; importing optimum_lrs registers it with transformers. Every
argument but `--local-data DIR` is lm-eval's; `--local-data` writes the local forms of the tasks that have one
(`optimum_lrs.zero_shot_tasks`) and hands them to lm-eval as `--include_path`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import optimum_lrs  # noqa: F401  (registers the optimum_lrs quantizer with transformers)

from ..zero_shot_tasks import TASKS, write_task_dir


def main(argv: list[str] | None = None) -> None:
    ours = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    ours.add_argument("--local-data")
    known, argv = ours.parse_known_args(sys.argv[1:] if argv is None else argv)  # argv: lm-eval's arguments
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as exc:
        raise SystemExit(f"lm-eval is not installed: pip install 'optimum-lrs[eval]' ({exc})") from None
    with tempfile.TemporaryDirectory(prefix="optimum-lrs-tasks-") as scratch:
        if known.local_data is not None:
            theirs = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
            theirs.add_argument("--tasks", default="")
            named = theirs.parse_known_args(argv)[0].tasks.split(",")
            tasks = [t for t in named if t in TASKS] or sorted(TASKS)  # the others are lm-eval's to find
            argv = [*argv, "--include_path", str(write_task_dir(tasks, known.local_data, scratch))]
        sys.argv = ["lm_eval", *argv]
        cli_evaluate()


if __name__ == "__main__":
    main()
