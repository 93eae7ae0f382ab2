"""Zero-shot accuracy through lm-evaluation-harness itself (its HFLM wrapper and stock tasks) on the local task
data in ../shared/data/zeroshot: in memory, by `optimum-lrs eval --tasks`, and by lm-eval's own command line
through our launcher, for a dense and a compressed model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_lrs import LowRankSparseConfig
from optimum_lrs.evaluation import zero_shot
from optimum_lrs.zero_shot_tasks import TASKS, write_task_dir

from .conftest import REPO, SHARED_DATA, shared_data
from .test_cli import cli

pytest.importorskip("lm_eval", reason="lm-eval comes with the test extra: pip install -e '.[test]'")
DATA = SHARED_DATA / "zeroshot"


@pytest.fixture
def zero_shot_data():
    """The task data, or a skip (a failure under LRS_REQUIRE_DATA=1) where ../shared/data has none."""
    return shared_data("zeroshot")


needs_data = pytest.mark.usefixtures("zero_shot_data")
LIMIT = 6


@pytest.fixture(scope="module")
def compressed_dir(dense_with_tokenizer, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(dense_with_tokenizer,
                                                 quantization_config=LowRankSparseConfig(param_ratio=0.5))
    out = tmp_path_factory.mktemp("zero-shot") / "compressed"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(dense_with_tokenizer).save_pretrained(out)
    return out


@needs_data
def test_local_tasks_hold_the_releases_rows_in_the_stock_fields(tmp_path):
    write_task_dir(sorted(TASKS), DATA, tmp_path)
    rows = {t: [json.loads(line) for line in (tmp_path / f"{t}.jsonl").read_text().splitlines()] for t in TASKS}
    labels = (DATA / "piqa" / "valid-labels.lst").read_text().split()
    assert len(rows["piqa"]) == len(labels) == 1838 and [r["label"] for r in rows["piqa"]] == [int(y) for y in labels]
    assert set(rows["piqa"][0]) == {"goal", "sol1", "sol2", "label"}
    boolq = [json.loads(line) for line in (DATA / "boolq" / "dev.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows["boolq"]] == [int(r["answer"]) for r in boolq] and len(boolq) == 3270
    assert len(rows["winogrande"]) == 1267 and rows["winogrande"][0]["answer"] in ("1", "2")
    assert len(rows["lambada_openai"]) == 5153
    config = json.loads((tmp_path / "piqa.yaml").read_text())
    assert config["include"].endswith(os.path.join("lm_eval", "tasks", "piqa", "piqa.yaml"))
    assert config["dataset_kwargs"] == {"data_files": {"validation": str(tmp_path / "piqa.jsonl")}}


@needs_data
def test_zero_shot_runs_lm_evals_tasks_on_dense_and_compressed_models(dense_with_tokenizer, compressed_dir):
    tokenizer = AutoTokenizer.from_pretrained(dense_with_tokenizer)
    results = {}
    for name, path in (("dense", dense_with_tokenizer), ("compressed", compressed_dir)):
        model = AutoModelForCausalLM.from_pretrained(path)
        results[name] = zero_shot(model, tokenizer, sorted(TASKS), DATA, limit=LIMIT)
    for result in results.values():
        assert set(result) == {*TASKS, "mean"}
        for task in TASKS:
            acc = result[task]["acc"]
            assert acc * LIMIT == pytest.approx(round(acc * LIMIT)) and 0 <= acc <= 1  # a share of LIMIT items
            assert result[task]["acc_stderr"] > 0 or acc in (0.0, 1.0)
        assert result["mean"]["acc"] == pytest.approx(sum(result[t]["acc"] for t in TASKS) / len(TASKS))
        assert result["lambada_openai"]["perplexity"] > 1
    # the compressed model is another model: lambada's last-word perplexity moves
    assert results["dense"]["lambada_openai"]["perplexity"] != results["compressed"]["lambada_openai"]["perplexity"]

    # the command line gives the same figures for the saved model (in batches of 2), and records them
    proc = cli("--quiet", "eval", compressed_dir, "--tasks", "piqa,boolq", "--data-dir", DATA, "--limit", LIMIT,
               "--batch-size", 2, "--record")
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    for task in ("piqa", "boolq"):
        assert printed[f"{task}_acc"] == round(results["compressed"][task]["acc"], 4)
    recorded = json.loads((compressed_dir / "config.json").read_text())["quantization_config"]["compressed"]
    assert recorded["evaluation"] == printed and f"| {printed['piqa_acc']} |" in (compressed_dir / "README.md").read_text()


@needs_data
def test_lm_evals_own_command_line_loads_a_compressed_checkpoint(compressed_dir, tmp_path):
    """`lm_eval --model hf` through the launcher, which imports optimum_lrs first and serves the local tasks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "optimum_lrs.integrations.lm_eval_cli", "--model", "hf",
                           "--model_args", f"pretrained={compressed_dir}", "--tasks", "piqa", "--limit", str(LIMIT),
                           "--local-data", str(DATA), "--output_path", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "piqa" in proc.stdout and "acc" in proc.stdout
    saved = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert saved["results"]["piqa"]["acc,none"] * LIMIT == pytest.approx(round(saved["results"]["piqa"]["acc,none"] * LIMIT))


@pytest.mark.parametrize(("args", "message"), [
    (["--tasks", "hellaswag", "--data-dir", "{data}"], "unknown zero-shot task(s) ['hellaswag']"),
    (["--tasks", "piqa"], "--tasks needs --data-dir"),
    (["--tasks", "piqa", "--data-dir", "{tmp}", "--limit", "0"], "--limit must be at least 1"),
    ([], "give --text FILE"),
])
def test_bad_zero_shot_invocations_fail_before_loading(args, message, compressed_dir, tmp_path):
    proc = cli("eval", compressed_dir, *[a.format(data=DATA, tmp=tmp_path) for a in args])
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_missing_task_data_names_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no data at .*{tmp_path / 'piqa' / 'valid.jsonl'}"):
        write_task_dir(["piqa"], tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="the tasks with local data are"):
        zero_shot(None, None, ["piqa", "arc_easy"], tmp_path)
