"""Model card, allocation table and plot of a compressed model, and `push_to_hub` that publishes them.

transformers' `push_to_hub` builds its README from whatever card the repo already has (adding tags).
So for a compressed model the card and the allocation plot are committed first, and transformers'
own push then keeps that card.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData
from torch import nn
from transformers import PreTrainedModel

from ..nn.linear import LowRankSparseLinear
from ..nn.storage import STORAGES

logger = logging.getLogger(__name__)

PLOT_NAME = "allocation.png"
TAGS = ["optimum-lrs", "low-rank", "sparse", "compressed"]


def lrs_config(model: nn.Module) -> Any:
    """The model's LowRankSparseConfig, or None when the model is not compressed by optimum_lrs."""
    from ..config import LowRankSparseConfig

    config = getattr(getattr(model, "config", None), "quantization_config", None)
    return config if isinstance(config, LowRankSparseConfig) and config.is_compressed else None


def allocation_table(model: nn.Module) -> list[dict[str, Any]]:
    """One row per compressed layer: shape, rank, sparse entries and the kept share of its parameters."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, LowRankSparseLinear):
            dense = m.in_features * m.out_features
            rows.append({
                "layer": name, "out_features": m.out_features, "in_features": m.in_features, "rank": m.rank,
                "nnz": m.nnz, "kept": m.num_parameters, "dense": dense,
                "lowrank_share": m.rank * (m.in_features + m.out_features) / dense, "sparse_share": m.nnz / dense,
            })
    if not rows:
        raise ValueError("the model has no LowRankSparseLinear layers; it is not compressed")
    return rows


def plot_allocation(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Stacked bars per layer: share of its dense parameters kept as low-rank factors and as sparse entries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = range(len(rows))
    low = [r["lowrank_share"] for r in rows]
    sparse = [r["sparse_share"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, len(rows) * 0.06), 3.5))
    ax.bar(x, low, width=1.0, label="low-rank r(m+n)/mn", color="tab:blue")
    ax.bar(x, sparse, width=1.0, bottom=low, label="sparse nnz/mn", color="tab:orange")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("compressed layer (model order)")
    ax.set_ylabel("kept / dense parameters")
    ax.set_title(title or "Per-layer allocation")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def model_card(model: nn.Module, repo_id: str | None = None) -> ModelCard:
    """A Hub model card: front matter (base model, relation, library, tags), budget, quality, how to load."""
    config = lrs_config(model)
    if config is None:
        raise ValueError("the model is not compressed by optimum_lrs; there is no allocation to describe")
    rows = allocation_table(model)
    kept, dense = sum(r["kept"] for r in rows), sum(r["dense"] for r in rows)
    data = ModelCardData(library_name="transformers", tags=list(TAGS) + [f"allocation-{config.allocation.name}"])
    result = config.compressed
    if result.base_model:
        data.base_model = result.base_model
        data.base_model_relation = "quantized"  # the Hub's relation for compressed derivatives
    name = repo_id or "this model"
    lines = [
        f"# {name}",
        "",
        f"Low-rank + sparse compression of {result.base_model or 'a transformers model'} with "
        "[optimum-lrs](https://pypi.org/project/optimum-lrs/) (CAP, arXiv 2505.03801): every targeted linear layer "
        f"is stored as U V + S (low-rank factors plus a sparse matrix whose positions are kept as "
        f"{STORAGES[config.sparse_format].description}), with ranks and sparse entries shared out "
        "across layers under one parameter budget."
        + ("" if config.quantization is None else
           f" U, V and the sparse values are stored as {config.quantization.bits}-bit integer codes with one scale "
           f"per {config.quantization.group_size} values."),
        "",
        "| budget | allocation | compressed layers | kept parameters | dense parameters |",
        "|---|---|---|---|---|",
        f"| {config.budget_setting} | {config.allocation.name} | {len(rows)} | {kept:,} ({kept / dense:.1%}) | {dense:,} |",
        "",
    ]
    if result.block_matching is not None:
        lines += [f"Block output matching lowered the output error of {result.blocks_gained} of "
                  f"{len(result.block_matching)} decoder blocks on the first calibration batch.", ""]
    if result.evaluation:
        lines += ["## Measured quality", "", "| " + " | ".join(result.evaluation) + " |",
                  "|" + "---|" * len(result.evaluation), "| " + " | ".join(str(v) for v in result.evaluation.values()) + " |", ""]
    else:
        lines += ["Quality was not measured before upload (`optimum-lrs eval DIR --text FILE --record` records it).", ""]
    lines += [
        "## How to load",
        "",
        "```bash",
        "pip install optimum-lrs",
        "```",
        "",
        "```python",
        "import optimum_lrs  # registers the optimum_lrs model type and quantization method",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id or "<repo id>"}")',
        "```",
        "",
        "Without `import optimum_lrs`, transformers refuses the checkpoint (unknown model type `optimum_lrs`).",
        "",
        "## Per-layer allocation",
        "",
        f"![per-layer allocation]({PLOT_NAME})",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_card(model: nn.Module, directory: str | Path, repo_id: str | None = None) -> None:
    """Write README.md and the allocation plot into `directory` (next to a saved checkpoint)."""
    directory = Path(directory)
    model_card(model, repo_id).save(directory / "README.md")
    plot_allocation(allocation_table(model), directory / PLOT_NAME, title=f"{repo_id or ''} allocation".strip())


def push_to_hub(model: PreTrainedModel, repo_id: str, *, base_model: str | None = None, tokenizer: Any = None,
                commit_message: str | None = None, commit_description: str | None = None, private: bool | None = None,
                token: bool | str | None = None, revision: str | None = None, create_pr: bool = False,
                max_shard_size: int | str | None = "50GB") -> Any:
    """Push a compressed model to the Hub in one commit: its checkpoint (as `save_pretrained` writes it), model
    card and allocation plot, and `tokenizer`'s files where one is given. One commit means a push that fails
    leaves the repo as it was, never a card without weights or some shards without the others, and running it
    again is safe (the error says so). transformers' own push keeps a README it finds in the repo, but writes a
    template card where there is none, and commits the tokenizer separately.

    `base_model`: the dense model's Hub id, recorded in config.json and the card (where the model was compressed
    from a local copy; a Hub id it was loaded from is recorded already). The other keywords are
    `model.push_to_hub`'s. Any model that is not compressed goes to `model.push_to_hub` (and `tokenizer`'s own).
    Returns the commit's `CommitInfo`."""
    hub_args = {"commit_description": commit_description, "revision": revision, "create_pr": create_pr}
    config = lrs_config(model)
    if config is None:
        url = model.push_to_hub(repo_id, commit_message=commit_message, private=private, token=token,
                                max_shard_size=max_shard_size, **hub_args)
        if tokenizer is not None:
            tokenizer.push_to_hub(repo_id, commit_message=commit_message, private=private, token=token, **hub_args)
        return url
    if base_model is not None:
        config.compressed = replace(config.compressed, base_model=base_model)  # checked as a Hub id there
    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            write_card(model, tmp, repo_id)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, **hub_args,
                                     commit_message=commit_message or "Upload a model compressed by optimum-lrs")
    except Exception as exc:
        exc.add_note(f"optimum-lrs: pushing to the Hub repo {repo_id!r} failed. The push is one commit, so the repo "
                     "holds all of it or none of it: running the push again is safe.")
        raise
    logger.info("pushed the checkpoint, model card and allocation plot to %s in one commit", repo_id)
    return info
