"""Compressed models and their LoRA adapters through a real Hub round trip (local HubServer, real clients)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from optimum_lrs import LowRankSparseConfig

from .hub_server import HubServer, run_client

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    with HubServer() as server:
        yield server


@pytest.fixture(scope="module")
def compressed(dense_with_tokenizer, tmp_path_factory) -> Path:
    cfg = LowRankSparseConfig(param_ratio=0.5)
    model = AutoModelForCausalLM.from_pretrained(dense_with_tokenizer, quantization_config=cfg)
    model.config.quantization_config.compressed.evaluation = {"perplexity": 12.5, "dataset": "x"}  # as `eval --record`
    out = tmp_path_factory.mktemp("hub-compressed")
    model.save_pretrained(out)
    return out


def test_push_to_hub_writes_card_and_reloads_identically(hub, compressed, tmp_path, input_ids):
    torch.save(input_ids, tmp_path / "ids.pt")
    run_client(hub, tmp_path / "home1", f"""
        import optimum_lrs
        from transformers import AutoModelForCausalLM
        optimum_lrs.push_to_hub(AutoModelForCausalLM.from_pretrained({str(compressed)!r}), "user/tiny-lrs",
                                base_model={BASE!r})
    """)
    files = hub.files("user/tiny-lrs")
    assert {"config.json", "model.safetensors", "README.md", "allocation.png"} <= set(files)
    assert files["allocation.png"].startswith(b"\x89PNG")
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == BASE and card.data.base_model_relation == "quantized"
    assert card.data.library_name == "transformers"
    assert {"optimum-lrs", "low-rank", "sparse", "allocation-uniform"} <= set(card.data.tags)
    assert "pip install optimum-lrs" in card.text and "import optimum_lrs" in card.text
    assert "12.5" in card.text and "| param_ratio=0.5 | uniform |" in card.text and "allocation.png" in card.text
    assert "positions are kept as a bitmask" in card.text  # the default layout, named as stored
    assert "Block output matching lowered the output error of 2 of 2 decoder blocks" in card.text  # on by default
    pushed = json.loads(files["config.json"])
    assert pushed["model_type"] == "optimum_lrs" and pushed["quantization_config"]["compressed"]["base_model"] == BASE

    run_client(hub, tmp_path / "home2", f"""
        import torch, optimum_lrs
        model = optimum_lrs.LRSModelForCausalLM.from_pretrained("user/tiny-lrs")
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})
    """)
    local = AutoModelForCausalLM.from_pretrained(compressed)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "out.pt"), local(input_ids).logits)
    assert hub.unhandled == []


def test_lora_adapter_of_compressed_model_round_trips(hub, compressed, tmp_path, input_ids):
    torch.save(input_ids, tmp_path / "ids.pt")
    run_client(hub, tmp_path / "home1", f"""
        import torch, optimum_lrs
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained({str(compressed)!r}),
                               optimum_lrs.LowRankSparseLoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False))
        model.push_to_hub("user/tiny-lrs-lora")
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'pushed.pt')!r})
    """)
    assert "adapter_config.json" in hub.files("user/tiny-lrs-lora")
    run_client(hub, tmp_path / "home2", f"""
        import torch, optimum_lrs
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(compressed)!r})
        model = optimum_lrs.load_adapter(base, "user/tiny-lrs-lora")
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'pulled.pt')!r})
    """)
    pushed, pulled = torch.load(tmp_path / "pushed.pt"), torch.load(tmp_path / "pulled.pt")
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(compressed)(input_ids).logits
    assert torch.equal(pushed, pulled) and not torch.allclose(pushed, plain)  # the adapter is non-trivial
    assert hub.unhandled == []


# One fault per failed push, in the order a push reaches the routes (create the repo, preupload, LFS batch, LFS
# upload, commit): route, status (None: the connection dropped unanswered), whether the client retries it itself.
PUSH_FAULTS = [("create_repo", 401, False), ("preupload", 500, True), ("lfs_batch", 403, False),
               ("lfs_put", None, True), ("commit", 500, False), ("commit", None, False), ("commit", 404, False)]


@pytest.fixture()
def fresh_hub() -> Iterator[HubServer]:
    """A Hub of its own: no LFS object stored yet, nothing counted."""
    with HubServer() as server:
        yield server


def test_failed_pushes_commit_nothing_name_the_repo_and_a_retry_succeeds(fresh_hub, compressed, dense_with_tokenizer,
                                                                        tmp_path):
    """Every fault of PUSH_FAULTS is injected into one push attempt after another; each attempt that fails must
    leave the repo as it was (no commit, hence no card without weights and no partial set of shards) and say
    which repo and that retrying is safe; the push after the last fault lands everything in one commit, through
    the LFS upload path the Hub takes for safetensors files."""
    for route, status, _ in PUSH_FAULTS:
        fresh_hub.inject(route, status)
    failures = sum(not retried for *_, retried in PUSH_FAULTS)
    out = run_client(fresh_hub, tmp_path / "home", f"""
        import json, traceback
        import optimum_lrs
        from huggingface_hub import HfApi
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(compressed)!r})
        tokenizer = AutoTokenizer.from_pretrained({str(dense_with_tokenizer)!r})
        for attempt in range({failures + 1}):
            try:
                optimum_lrs.push_to_hub(model, "user/faulty", tokenizer=tokenizer)
                print(json.dumps({{"attempt": attempt, "pushed": True}}))
            except Exception as exc:
                text = "".join(traceback.format_exception(exc))
                try:
                    files = HfApi().list_repo_files("user/faulty")
                except Exception:  # the first fault comes before the repo exists
                    files = None
                print(json.dumps({{"attempt": attempt, "error": type(exc).__name__, "files": files,
                                  "names_repo": "'user/faulty'" in text, "safe": "running the push again is safe" in text}}))
    """)
    attempts = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [a.get("pushed", False) for a in attempts] == [False] * failures + [True], attempts
    for attempt in attempts[:-1]:
        assert attempt["names_repo"] and attempt["safe"], attempt
        assert attempt["files"] in (None, [".gitattributes"], []), attempt  # nothing committed
    assert fresh_hub.commits("user/faulty") == 2  # the repo's initial empty commit and the one push
    files = fresh_hub.files("user/faulty")
    assert {"config.json", "README.md", "allocation.png", "tokenizer.json"} <= set(files)
    pushed, saved = load_safetensors(files["model.safetensors"]), load_file(compressed / "model.safetensors")
    assert pushed.keys() == saved.keys() and all(torch.equal(pushed[k], saved[k]) for k in saved)
    # the client itself retries the preupload's 500 and the dropped LFS upload, not a failed commit
    assert fresh_hub.requests["lfs_put"] == 2 and fresh_hub.requests["commit"] == 4, fresh_hub.requests
    assert fresh_hub.unhandled == []


def test_cli_compresses_a_hub_model_and_pushes_what_a_local_run_writes(hub, dense_with_tokenizer, tmp_path,
                                                                       input_ids):
    """`optimum-lrs compress user/dense --push-to-hub user/lrs --seed 1 --calibration x.jsonl` against the local
    Hub: the dense model read from the Hub, the compressed one pushed in one commit with its card and tokenizer;
    pulled back, it gives the logits of the same command run on the local copy."""
    texts = (Path(__file__).resolve().parents[1] / "README.md").read_text().split("\n\n")
    (tmp_path / "x.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts if t.strip()))
    command = ["compress", "--seed", "1", "--calibration", str(tmp_path / "x.jsonl"), "--ratio", "0.5"]
    run_client(hub, tmp_path / "home", f"""
        from huggingface_hub import HfApi
        from optimum_lrs.integrations.cli import main
        HfApi().create_repo("user/dense")
        HfApi().upload_folder(repo_id="user/dense", folder_path={str(dense_with_tokenizer)!r})
        assert main({command!r} + ["user/dense", "--output", {str(tmp_path / "pushed")!r},
                                   "--push-to-hub", "user/lrs"]) == 0
        # the same command on the local copy, in this process: the same threads, so the same arithmetic
        assert main({command!r} + [{str(dense_with_tokenizer)!r}, "--output", {str(tmp_path / "local")!r}]) == 0
    """)
    files = hub.files("user/lrs")
    assert {"config.json", "model.safetensors", "README.md", "allocation.png", "tokenizer.json"} <= set(files)
    assert hub.commits("user/lrs") == 2  # the initial empty commit and the one push
    pulled = tmp_path / "pulled"
    for name, data in files.items():
        (pulled / name).parent.mkdir(parents=True, exist_ok=True)
        (pulled / name).write_bytes(data)
    with torch.no_grad():
        remote = AutoModelForCausalLM.from_pretrained(pulled)(input_ids).logits
        local = AutoModelForCausalLM.from_pretrained(tmp_path / "local")(input_ids).logits
    assert torch.equal(remote, local)
    assert json.loads(files["config.json"])["quantization_config"]["seed"] == 1
    assert hub.unhandled == []
