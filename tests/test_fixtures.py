"""Checkpoints saved by earlier versions of the package (tests/fixtures/format*/, written by
tests/fixtures/make_fixtures.py at the commit in each made_by.json) load with today's code and give the logits
they gave when they were saved."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from optimum_lrs import LRSModelForCausalLM
from optimum_lrs.nn.linear import LowRankSparseLinear

FIXTURES = sorted(p for p in (Path(__file__).parent / "fixtures").glob("format*/*") if p.is_dir())


def test_fixtures_exist():
    assert {f"{p.parent.name}/{p.name}" for p in FIXTURES} >= {
        "format1/llama-bitmask", "format1/qwen2-csr", "format2/llama-bitmask", "format2/qwen2-csr",
        "format3/llama-bitmask-4bit"}


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_saved_checkpoint_loads_with_its_outputs(fixture):
    expected = load_file(fixture / "expected.safetensors")
    model = LRSModelForCausalLM.from_pretrained(fixture).eval()
    layers = [m for m in model.modules() if isinstance(m, LowRankSparseLinear)]
    assert len(layers) == 14  # 7 per block, 2 blocks: nothing fell back to dense
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_todays_code_writes_the_fixture_tensors_again(fixture, tmp_path):
    """The same recipe and seed give the tensors the fixture's version wrote (make_fixtures.py's recipe): the
    redesigned configuration changed config.json's layout, not what compression computes."""
    from optimum_lrs import LowRankSparseConfig, compress_

    from .fixtures.make_fixtures import FIXTURES as RECIPES

    build, fields = {name: (build, fields) for name, build, fields in RECIPES}[fixture.name]
    model = build()
    compress_(model, LowRankSparseConfig(param_ratio=0.5, activation_aware=False, **fields))
    model.save_pretrained(tmp_path)
    written, saved = load_file(tmp_path / "model.safetensors"), load_file(fixture / "model.safetensors")
    assert written.keys() == saved.keys()
    # Fitted codes are rounded one after another with each rounding's error fed forward (GPTQ), so a product
    # rounded differently by another CPU's vector instructions flips a code at a tie and the rest of the row
    # follows: codes and their scales are compared exactly only on the vector instructions the fixture was made on.
    made_on = json.loads((fixture / "made_by.json").read_text()).get("cpu")
    same_cpu = made_on in (None, torch.backends.cpu.get_cpu_capability())
    codes = [key for key in saved if key.endswith(("_codes", "_scales"))]
    for key, tensor in saved.items():
        if same_cpu or key not in codes:
            torch.testing.assert_close(written[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    if not same_cpu:
        # Elsewhere: the positions, norms and embeddings above exactly, and most codes (95% on an AVX2-only EPYC
        # against the fixture's AVX-512 ones) and the logits near the fixture's (6.8% of their norm there, where
        # the compression's own error is 29%).
        equal = sum(int((written[k] == saved[k]).sum()) for k in codes if k.endswith("_codes"))
        assert equal / sum(saved[k].numel() for k in codes if k.endswith("_codes")) > 0.85
        expected = load_file(fixture / "expected.safetensors")
        with torch.no_grad():
            logits = model(expected["input_ids"]).logits
        assert float((logits - expected["logits"]).norm() / expected["logits"].norm()) < 0.15
