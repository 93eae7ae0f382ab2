"""`LRSQuantizer`: optimum's quantizer convention (`from_pretrained(...)` then `quantize(save_dir=...)`).

This is also what the command line runs. The output directory is written atomically: everything
goes into a hidden staging directory beside it, which is renamed into place only when complete, so
an interrupted run never leaves a directory that loads as a valid but incomplete model.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from optimum.quantization_base import OptimumQuantizer
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..calibration import find_tokenizer
from ..config import LowRankSparseConfig
from ..distributed import Ranks
from ..io.model_card import write_card
from .transformers import compress_

logger = logging.getLogger(__name__)


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Fail before any work when `path` cannot receive a saved model (ValueError naming the problem)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"output {path} exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"output {path} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise ValueError(f"output {path}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"output {path}: parent directory {parent} is not writable")


@contextlib.contextmanager
def staged_output(save_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A hidden staging directory beside `save_dir`, renamed into place only when the block exits normally:
    an interrupted or failed write never leaves a directory that loads as a valid but incomplete model, and
    never replaces a good one."""
    target = Path(save_dir)
    check_output_dir(target, overwrite)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.resolve().parent))
    try:
        yield staging
        if not target.exists():
            os.replace(staging, target)
        elif not _exchange(staging, target):  # two renames: a kill between them leaves the old one set aside
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old)
        # after an exchange `staging` holds the old output, removed below
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux's renameat2 with RENAME_EXCHANGE), so that a kill at any point of
    an overwrite leaves the old output or the new one at `b`, never neither; False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_cwd, rename_exchange = -100, 2
    return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0


def save_atomically(model: PreTrainedModel, save_dir: str | Path, tokenizer: Any = None, repo_id: str | None = None,
                    overwrite: bool = False) -> Path:
    """Save model, tokenizer, model card and allocation plot to `save_dir`, all or nothing."""
    with staged_output(save_dir, overwrite) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_card(model, staging, repo_id)
    return Path(save_dir)


class LRSQuantizer(OptimumQuantizer):
    """Compress a causal LM and write it as an optimum_lrs checkpoint.

    >>> quantizer = LRSQuantizer.from_pretrained("HuggingFaceTB/SmolLM2-135M")
    >>> model = quantizer.quantize(save_dir="smollm2-lrs", compression_config=LowRankSparseConfig(param_ratio=0.5))
    """

    def __init__(self, model: PreTrainedModel, tokenizer: Any = None):
        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"LRSQuantizer needs a transformers PreTrainedModel, got {type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, model_or_path: str | Path | PreTrainedModel, file_name: str | None = None,
                        tokenizer: Any = None, **kwargs: Any) -> LRSQuantizer:
        """Load the dense model (`file_name`: a GGUF file inside `model_or_path`) and, if none is given,
        its tokenizer (None when the repo has none; compression then needs token-id calibration data)."""
        if isinstance(model_or_path, PreTrainedModel):
            return cls(model_or_path, tokenizer)
        source = {"gguf_file": file_name} if file_name else {}
        model = AutoModelForCausalLM.from_pretrained(model_or_path, **source, **kwargs)
        if tokenizer is None:
            tokenizer = find_tokenizer(model_or_path, **source)
            if tokenizer is None:
                logger.warning("no tokenizer loads from %s; pass token ids as calibration_data", model_or_path)
        return cls(model, tokenizer)

    def quantize(self, save_dir: str | Path, file_prefix: str | None = None,
                 compression_config: LowRankSparseConfig | dict | None = None, overwrite: bool = False,
                 repo_id: str | None = None, **kwargs: Any) -> PreTrainedModel:
        """Compress the model in place with `compression_config` and save it atomically to `save_dir`."""
        if file_prefix is not None:
            raise ValueError("file_prefix is not supported: transformers names the safetensors shards")
        if kwargs:
            raise TypeError(f"LRSQuantizer.quantize got unexpected arguments {sorted(kwargs)}")
        config = compression_config if compression_config is not None else LowRankSparseConfig()
        if isinstance(config, dict):
            config = LowRankSparseConfig.from_dict(config)
        check_output_dir(Path(save_dir), overwrite)
        if config.inputs.tokenizer is None and self.tokenizer is not None:
            config = config.with_inputs(tokenizer=self.tokenizer)
        compress_(self.model, config)
        if Ranks().writes:  # several ranks hold the same model: one writes it
            save_atomically(self.model, save_dir, self.tokenizer, repo_id, overwrite)
            logger.info("saved the compressed model to %s", save_dir)
        return self.model
