"""Round trips through the real `huggingface_hub` / `transformers` clients against the in-memory `HubServer`.

Clients run in fresh interpreters because `huggingface_hub` reads `HF_ENDPOINT` at import (see hub_server.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from .hub_server import HubServer, run_client

REPO_ID = "user/files"
README = "---\nlicense: mit\ntags:\n- low-rank\n- test\n---\n\n# Files\n\nA card with YAML front matter.\n"


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    with HubServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _no_unhandled_route(hub: HubServer) -> Iterator[None]:
    """Whatever a test does, the clients must have needed no route the server lacks."""
    yield
    assert hub.unhandled == []


@pytest.fixture(scope="module")
def local_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a compressed checkpoint folder looks like: card, config, safetensors weights in a subfolder too."""
    folder = tmp_path_factory.mktemp("upload")
    (folder / "README.md").write_text(README)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    tensors = {"w": torch.arange(64, dtype=torch.float32).reshape(8, 8), "b": torch.ones(8, dtype=torch.bfloat16)}
    save_file(tensors, folder / "model.safetensors")
    (folder / "extra").mkdir()
    save_file({"u": torch.zeros(4, 4)}, folder / "extra" / "adapter.safetensors")
    return folder


@pytest.fixture(scope="module")
def uploaded(hub: HubServer, local_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """create_repo (twice: exist_ok must accept the 409) + upload_folder; return the commit sha."""
    out = run_client(hub, tmp_path_factory.mktemp("home"), """
        import sys
        from huggingface_hub import HfApi
        api = HfApi()
        for _ in range(2):
            url = api.create_repo(sys.argv[1], exist_ok=True)
        assert url.repo_id == sys.argv[1], url
        info = api.upload_folder(repo_id=sys.argv[1], folder_path=sys.argv[2], commit_message="upload")
        print(info.oid)
    """, REPO_ID, str(local_folder))
    return out.split()[-1]


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_upload_folder_stores_exact_bytes(hub: HubServer, local_folder: Path, uploaded: str) -> None:
    assert re.fullmatch(r"[0-9a-f]{40}", uploaded)
    assert hub.files(REPO_ID) == _tree(local_folder)


def test_snapshot_download_returns_same_bytes(
    hub: HubServer, local_folder: Path, uploaded: str, tmp_path: Path,
) -> None:
    out = run_client(hub, tmp_path / "home", """
        import sys
        from huggingface_hub import snapshot_download
        print(snapshot_download(sys.argv[1], local_dir=sys.argv[2]))
    """, REPO_ID, str(tmp_path / "snap"))
    snapshot = Path(out.split()[-1])
    downloaded = {k: v for k, v in _tree(snapshot).items() if not k.startswith(".cache/")}
    assert downloaded == _tree(local_folder)
    assert load_safetensors(downloaded["model.safetensors"])["w"].equal(torch.arange(64.0).reshape(8, 8))


def test_missing_repo_and_file_raise_hub_errors(hub: HubServer, uploaded: str, tmp_path: Path) -> None:
    out = run_client(hub, tmp_path / "home", """
        import sys
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
        cases = {
            "file of missing repo": (lambda: hf_hub_download("user/missing", "config.json"), RepositoryNotFoundError),
            "snapshot of missing repo": (lambda: snapshot_download("user/missing"), RepositoryNotFoundError),
            "missing file": (lambda: hf_hub_download(sys.argv[1], "nope.json"), RemoteEntryNotFoundError),
            "missing revision": (lambda: hf_hub_download(sys.argv[1], "config.json", revision="f" * 40),
                                 RevisionNotFoundError),
        }
        for name, (call, expected) in cases.items():
            try:
                call()
            except expected as err:
                assert err.response.status_code == 404, (name, err)
                print("raised", name)
            else:
                raise AssertionError(f"{name}: no {expected.__name__}")
    """, REPO_ID)
    assert out.count("raised") == 4


def test_model_card_load_parses_front_matter_and_push_writes_it(hub: HubServer, uploaded: str, tmp_path: Path) -> None:
    out = run_client(hub, tmp_path / "home", """
        import json, sys
        from huggingface_hub import HfApi, ModelCard
        card = ModelCard.load(sys.argv[1])
        print(json.dumps({"data": card.data.to_dict(), "text": card.text}))
        card.data.tags.append("pushed")
        HfApi().create_repo("user/card")
        card.push_to_hub("user/card")
    """, REPO_ID)
    card = json.loads(out.splitlines()[-1])
    assert card["data"] == {"license": "mit", "tags": ["low-rank", "test"]}
    assert card["text"].strip().startswith("# Files")
    assert hub.files("user/card")["README.md"].decode() == README.replace("- test\n", "- test\n- pushed\n")


def test_commit_updates_deletes_and_keeps_history(hub: HubServer, local_folder: Path, tmp_path: Path) -> None:
    """upload_file of unchanged bytes makes no commit; create_commit adds and deletes; an old sha serves old bytes."""
    out = run_client(hub, tmp_path / "home", """
        import json, sys
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download
        api, repo = HfApi(), "user/edits"
        api.create_repo(repo)
        old = api.upload_folder(repo_id=repo, folder_path=sys.argv[1]).oid
        same = api.upload_file(path_or_fileobj=sys.argv[1] + "/config.json", path_in_repo="config.json", repo_id=repo)
        new = api.create_commit(repo, [
            CommitOperationAdd("notes/todo.txt", b"prune more"),
            CommitOperationDelete("extra/"),
            CommitOperationDelete("model.safetensors"),
        ], commit_message="edit").oid
        files = sorted(f.path for f in api.list_repo_tree(repo, recursive=True))
        old_weights = open(hf_hub_download(repo, "model.safetensors", revision=old), "rb").read()
        print(json.dumps({"old": old, "same": same.oid, "new": new, "files": files, "old_size": len(old_weights),
                          "head": api.model_info(repo).sha}))
    """, str(local_folder))
    result = json.loads(out.splitlines()[-1])
    assert result["same"] == result["old"]  # unchanged content: the client skipped the commit
    assert result["new"] != result["old"] and result["head"] == result["new"]
    assert result["files"] == ["README.md", "config.json", "notes", "notes/todo.txt"]
    uploaded = _tree(local_folder)
    assert result["old_size"] == len(uploaded["model.safetensors"])
    assert hub.files("user/edits") == {
        "README.md": uploaded["README.md"], "config.json": uploaded["config.json"], "notes/todo.txt": b"prune more",
    }


def test_in_process_endpoint_argument_without_hf_endpoint(hub: HubServer, tmp_path: Path) -> None:
    """HfApi(endpoint=...) and hf_hub_download(endpoint=...) work in this process, where HF_ENDPOINT is unset."""
    from huggingface_hub import HfApi, constants, hf_hub_download

    assert constants.ENDPOINT != hub.url
    api = HfApi(endpoint=hub.url, token="dummy")
    api.create_repo("user/inproc")
    api.upload_file(path_or_fileobj=b"hello", path_in_repo="a/b.txt", repo_id="user/inproc")
    path = hf_hub_download("user/inproc", "a/b.txt", endpoint=hub.url, cache_dir=tmp_path, token="dummy")
    assert Path(path).read_bytes() == b"hello"
    assert api.whoami()["name"] == "user"


def test_transformers_push_to_hub_then_from_pretrained(hub: HubServer, tmp_path: Path) -> None:
    """push_to_hub probes README.md (404 EntryNotFound), from_pretrained resolves "main" to a sha via model info."""
    key = "model.layers.0.self_attn.q_proj.weight"
    pushed = run_client(hub, tmp_path / "push", """
        import json, sys, torch
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1))
        model.push_to_hub(sys.argv[1])
        print(json.dumps(model.state_dict()[sys.argv[2]].tolist()))
    """, "user/tiny", key)
    files = hub.files("user/tiny")
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert b"library_name: transformers" in files["README.md"]
    reloaded = run_client(hub, tmp_path / "pull", """
        import json, sys
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
        print(type(model).__name__)
        print(json.dumps(model.state_dict()[sys.argv[2]].tolist()))
    """, "user/tiny", key)
    name, weights = reloaded.splitlines()[-2:]
    assert name == "LlamaForCausalLM"
    expected = torch.tensor(json.loads(pushed.splitlines()[-1]))
    assert torch.equal(torch.tensor(json.loads(weights)), expected)
    assert torch.equal(load_safetensors(files["model.safetensors"])[key], expected)
