"""lm-evaluation-harness's own zero-shot tasks on local copies of their data.

lm-eval reads its task data from the Hugging Face Hub. Where the Hub is out of reach (or a user keeps the data
on disk), each task here is lm-eval's stock task (its YAML is included, so the prompt, the choices, the metrics
and any `!function` preprocessing are lm-eval's own) with only the dataset swapped for a JSON-lines file: the
local release's rows are converted to the fields the stock task reads and written beside a small YAML, in a
directory that `lm_eval.tasks.TaskManager(include_path=...)` (or the CLI's `--include_path`) loads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _labels(path: Path) -> list[int]:
    return [int(line) for line in path.read_text(encoding="utf-8").split()]


def _piqa(files: list[Path]) -> list[dict]:
    """The authors' release keeps the labels in a separate .lst file, one per row."""
    rows, labels = _jsonl(files[0]), _labels(files[1])
    if len(rows) != len(labels):
        raise ValueError(f"{files[0]} has {len(rows)} rows but {files[1]} {len(labels)} labels")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": y} for r, y in zip(rows, labels)]


def _boolq(files: list[Path]) -> list[dict]:
    """The release's `answer` (true/false) is super_glue's `label` (0/1)."""
    return [{"passage": r["passage"], "question": r["question"], "label": int(r["answer"])} for r in _jsonl(files[0])]


def _as_is(files: list[Path]) -> list[dict]:
    return _jsonl(files[0])


@dataclass(frozen=True)
class LocalTask:
    """One stock task: its YAML inside lm_eval/tasks, the split it evaluates, the local files (relative to the
    data directory) and how their rows become the stock task's fields."""

    stock_yaml: str
    split: str
    files: tuple[str, ...]
    convert: Callable[[list[Path]], list[dict]]


TASKS: dict[str, LocalTask] = {
    "piqa": LocalTask("piqa/piqa.yaml", "validation", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), _piqa),
    "winogrande": LocalTask("winogrande/default.yaml", "validation", ("winogrande/dev.jsonl",), _as_is),
    "boolq": LocalTask("super_glue/boolq/default.yaml", "validation", ("boolq/dev.jsonl",), _boolq),
    "lambada_openai": LocalTask("lambada/lambada_openai.yaml", "test", ("lambada/lambada_test.jsonl",), _as_is),
}
SPLIT_KEYS = {"validation": "validation_split", "test": "test_split"}


def check_tasks(tasks: list[str]) -> list[str]:
    """The task names, refused (with the known ones) where this package has no local form of them."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown zero-shot task(s) {unknown or tasks!r}: the tasks with local data are {sorted(TASKS)}")
    return list(tasks)


def write_task_dir(tasks: list[str], data_dir: str | Path, out_dir: str | Path) -> Path:
    """Write each task's converted data and YAML into `out_dir` (for `TaskManager(include_path=out_dir)`) from the
    local releases under `data_dir` (piqa/, winogrande/, boolq/, lambada/ as `TASKS` lists them)."""
    import lm_eval.tasks

    stock_root = Path(lm_eval.tasks.__file__).parent
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in check_tasks(tasks):
        task = TASKS[name]
        files = [data_dir / f for f in task.files]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"zero-shot task {name!r}: no data at {missing}; pass the directory that holds "
                                    f"{list(task.files)} (e.g. --data-dir ../shared/data/zeroshot)")
        stock = stock_root / task.stock_yaml
        if not stock.is_file():
            raise FileNotFoundError(f"zero-shot task {name!r}: lm-eval's task file {stock} is missing; install the "
                                    "lm-eval version optimum-lrs is tested with (pip install 'optimum-lrs[eval]')")
        rows = out_dir / f"{name}.jsonl"
        rows.write_text("".join(json.dumps(r) + "\n" for r in task.convert(files)), encoding="utf-8")
        other = "test_split" if task.split == "validation" else "validation_split"
        config = {"include": str(stock), "task": name, "dataset_path": "json", "dataset_name": None,
                  "dataset_kwargs": {"data_files": {task.split: str(rows)}}, "training_split": None,
                  SPLIT_KEYS[task.split]: task.split, other: None}
        (out_dir / f"{name}.yaml").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")  # JSON is YAML
    return out_dir
