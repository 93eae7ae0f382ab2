"""The results page is generated from the results files: a figure changed in one and not the other fails here.
The README's quick start runs as written, and the error catalogue names tests that exist."""

import re
import subprocess
import sys
from pathlib import Path

from .hub_server import HubServer, run_client

ROOT = Path(__file__).resolve().parents[1]


def test_results_page_matches_results_files():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_results_page_check_fails_on_a_stale_page(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import report
    finally:
        sys.path.pop(0)
    stale = tmp_path / "results.md"
    stale.write_text(report.render().replace("Quality against the peers", "Quality", 1))
    monkeypatch.setattr(report, "PAGE", stale)
    monkeypatch.setattr(sys, "argv", ["report.py", "--check"])
    try:
        report.main()
    except SystemExit as exit:
        assert "out of date" in str(exit.code)
    else:
        raise AssertionError("--check passed on a stale page")


def _python_blocks(section: str) -> list[str]:
    body = (ROOT / "README.md").read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.S)


def test_readme_quick_start_runs_as_written(dense_with_tokenizer, tmp_path):
    """The quick start's Python blocks, their placeholders (a model path, texts, a tokenizer) given real values,
    run on the tiny llama in a fresh interpreter pointed at the local Hub: compress on load both ways, save,
    reload without recompressing (same logits), push with the card, wrap in LoRA."""
    blocks = _python_blocks("Quick start")
    assert len(blocks) >= 3 and '"path/to/model"' in blocks[0] and "push_to_hub" in blocks[-1], blocks
    model_dir = repr(str(dense_with_tokenizer))
    setup = (f"import os\nos.chdir({str(tmp_path)!r})\nfrom transformers import AutoTokenizer\n"
             f"tok = AutoTokenizer.from_pretrained({model_dir})\n"
             "my_texts = ['A short text to calibrate on, written out in plain words.'] * 4\n")
    reloaded = ("import torch\nfrom optimum_lrs import LowRankSparseLinear\nids = torch.tensor([[1, 5, 9, 13]])\n"
                "assert any(isinstance(m, LowRankSparseLinear) for m in again.modules())\n"
                "with torch.no_grad():\n    assert torch.equal(model(ids).logits, again(ids).logits)\n")
    code = (setup + blocks[0].replace('"path/to/model"', model_dir) + reloaded + "\n".join(blocks[1:])
            + "from peft import PeftModel\nassert isinstance(peft_model, PeftModel)\nprint('ok')\n")
    with HubServer() as hub:
        assert "ok" in run_client(hub, tmp_path / "home", code)
        assert {"config.json", "model.safetensors", "README.md", "allocation.png"} <= set(hub.files("me/model-lrs"))
    assert (tmp_path / "model-lrs" / "config.json").is_file()


def test_the_error_catalogue_names_tests_that_exist():
    """Every `test_file.py::test_name[id]` docs/errors.md cites is a test pytest collects (a renamed test or a
    parameter id that no longer exists fails here)."""
    refs = sorted(set(re.findall(r"`(test_\w+\.py::[^`\s]+)`", (ROOT / "docs" / "errors.md").read_text())))
    assert len(refs) > 50, refs
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           *[f"tests/{ref}" for ref in refs]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
