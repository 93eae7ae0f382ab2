"""Checkpoint to checkpoint with one decoder block in memory: `compress_checkpoint`, the command line's path.

The model is built on the meta device (accelerate's `init_empty_weights`). The tensors outside the decoder
blocks (embeddings, final norm, head) are read from the safetensors shards first; each block's tensors are read
when the sequential pipeline reaches that block, and the compressed block is written as a shard of its own as
soon as it is done, then dropped. Held at any time: the embeddings and head, the calibration hidden states,
and about one block, whatever the depth. With CAP the blocks are read once to build its candidate pools (saved
in a temporary directory beside the output), once per policy step, and once for the final layers
(`allocation.cap.streamed`). The output is written in a staging directory and renamed into place only when
complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from .calibration import find_tokenizer
from .io.checkpoint import INDEX_NAME, CheckpointError, mark_compressed, read_weight_map
from .pipeline import compress_blocks
from .config import LowRankSparseConfig
from .distributed import Ranks
from .io.model_card import write_card
from .integrations.optimum import check_output_dir, staged_output

logger = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


class ShardReader:
    """Tensors of a safetensors checkpoint directory, read one at a time (never a whole shard)."""

    def __init__(self, directory: Path):
        self.directory = directory
        index, single = directory / INDEX_NAME, directory / "model.safetensors"
        if index.is_file():
            self.weight_map = read_weight_map(index)
        elif single.is_file():
            with self._open(single, "the header") as f:
                self.weight_map = dict.fromkeys(f.keys(), single.name)
        else:
            raise ValueError(
                f"{directory}: no model.safetensors or {INDEX_NAME}; compress_checkpoint reads safetensors checkpoints "
                "(load other formats, GGUF included, with from_pretrained and use optimum_lrs.compress_)"
            )

    def _open(self, file: Path, what: str):
        try:
            return safe_open(file, framework="pt")
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(
                f"{file}: cannot read {what} ({exc}); the checkpoint is damaged, or changed while it was being "
                "compressed; nothing was written"
            ) from exc

    def nbytes(self) -> int:
        """The size of the checkpoint's shards on disk."""
        return sum((self.directory / name).stat().st_size for name in set(self.weight_map.values()))

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def tensor(self, key: str) -> torch.Tensor:
        with self._open(self.directory / self.weight_map[key], f"tensor {key!r}") as f:
            return f.get_tensor(key)


class StreamedBlocks:
    """Reads each block's tensors before the pipeline compresses it and writes the block afterwards.

    Block i becomes shard i + 1 of n + 1; the last shard holds the tensors outside the blocks."""

    def __init__(self, model: nn.Module, reader: ShardReader, staging: Path | None, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.model, self.reader, self.staging, self.dtype, self.device = model, reader, staging, dtype, device
        self.shards, self.written = 1, 0  # set by `compress_checkpoint` once the blocks are known
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.tied = set(getattr(model, "all_tied_weights_keys", None) or {})

    def _keys(self, module: nn.Module, prefix: str) -> list[str]:
        return [f"{prefix}{k}" for k in module.state_dict()]

    def materialise(self, keys: list[str]) -> None:
        for key in keys:
            if key not in self.reader:
                if key in self.tied:
                    continue  # tied to a tensor read under its own name
                raise CheckpointError(f"{self.reader.directory}: no shard holds tensor {key!r} of the model")
            value = self.reader.tensor(key)
            set_module_tensor_to_device(self.model, key, self.device, value=value,
                                        dtype=self.dtype if value.is_floating_point() else None)

    def outside_blocks(self, block_names: list[str]) -> list[str]:
        return [k for k in self.model.state_dict() if not any(k.startswith(f"{b}.") for b in block_names)]

    def load(self, prefix: str, block: nn.Module) -> None:
        self.materialise(self._keys(block, f"{prefix}."))

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write `tensors` as the next shard (only where this process writes: `staging` is None on other ranks)."""
        self.written += 1
        if self.staging is None:
            return
        name = f"model-{self.written:05d}-of-{self.shards:05d}.safetensors"
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, self.staging / name, metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(tensors, name))
        self.total_size += sum(v.numel() * v.element_size() for v in tensors.values())

    def done(self, prefix: str, block: nn.Module) -> None:
        self.write({f"{prefix}.{k}": v for k, v in block.state_dict().items()})
        self.drop(block)

    def drop(self, block: nn.Module) -> None:
        block.to("meta")  # shapes stay (the model card reads them), the storage goes

    def finish(self, keys: list[str]) -> None:
        state = self.model.state_dict()
        self.write({k: state[k] for k in keys if k not in self.tied})
        if self.staging is None:
            return
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.staging / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _available_memory() -> int:
    """MemAvailable, or the memory cgroup's limit where that is lower (bytes; unknown: as if unlimited)."""
    limits = []
    try:
        limits.append(next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                           if line.startswith("MemAvailable:")))
    except (OSError, StopIteration, ValueError):
        pass
    paths = ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
    try:  # this process's own cgroup: "0::/path" (v2) or "N:memory:/path" (v1)
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, where = line.split(":", 2)
            if not controllers:
                paths.append(f"/sys/fs/cgroup{where}/memory.max")
            elif "memory" in controllers.split(","):
                paths.append(f"/sys/fs/cgroup/memory{where}/memory.limit_in_bytes")
    except (OSError, ValueError):
        pass
    for path in paths:
        try:
            limits.append(int(Path(path).read_text().split()[0]))
        except (OSError, ValueError, IndexError):  # absent, or "max"
            pass
    return min(limits) if limits else 1 << 62


def bound_heap() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for this process (unless `MALLOC_MMAP_THRESHOLD_` already sets it); True
    when set. glibc otherwise raises the threshold as large blocks are freed, serves later tensors of up to 32 MiB
    from a heap that fragments block after block, and the peak grows with depth: 0.72 bytes per checkpoint byte
    against 0.07 with the fixed threshold, at 1.3x the time (docs/performance.md, "Memory against depth")."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc's; absent from other C libraries
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 20))


@contextlib.contextmanager
def _scratch(output: Path, config: LowRankSparseConfig) -> Iterator[Path | None]:
    """For CAP, a temporary directory beside `output` (on its disk) for the candidate pools, removed afterwards."""
    if config.allocation.per_layer:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.cap-pools-", dir=output.parent) as directory:
        yield Path(directory)


def compress_checkpoint(source: str | Path, output: str | Path, config: LowRankSparseConfig, tokenizer: Any = None,
                        overwrite: bool = False, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu", bounded_heap: bool | None = None) -> Path:
    """Compress the safetensors checkpoint in directory `source` into an optimum_lrs checkpoint in `output`,
    reading and holding one decoder block at a time (uniform allocation or CAP, either pipeline).

    The result equals `from_pretrained(source, quantization_config=config)` followed by `save_pretrained`, tensor
    for tensor. `tokenizer`: the one to calibrate with and to save beside the model (default: the source's).
    `dtype`: the dtype the model is compressed in (default: the checkpoint's, as `from_pretrained` does);
    `device`: where each block is compressed. Under torchrun every rank runs this and rank 0 writes.
    `bounded_heap`: fix glibc's mmap threshold first (`bound_heap`), so that the peak stays flat with depth, at
    1.3-1.6x the time; None: where the checkpoint is larger than a quarter of the memory available.
    """
    source, output = Path(source), Path(output)
    if not isinstance(config, LowRankSparseConfig):
        raise TypeError(f"compress_checkpoint expects a LowRankSparseConfig, got {type(config).__name__}")
    if not config.streams:
        raise ValueError(
            f"compress_checkpoint streams blocks with allocation='uniform', or 'cap' with its layer policies on refit "
            f"candidates (got allocation={config.allocation!r}, refit.selection={config.refit.selection!r}): this "
            "allocation reads every layer's Stage 1 pools at once; load the model with "
            "from_pretrained(..., quantization_config=config)"
        )
    check_output_dir(output, overwrite)
    if not source.is_dir():
        raise ValueError(f"{source}: not a directory holding a safetensors checkpoint")
    reader = ShardReader(source)
    if bounded_heap is None:
        bounded_heap = reader.nbytes() > _available_memory() / 4
    if bounded_heap and bound_heap():
        logger.info("glibc's mmap threshold fixed at 1 MiB for this process (bounded_heap)")
    model_config = AutoConfig.from_pretrained(source)
    dtype = dtype or getattr(model_config, "dtype", None) or torch.float32
    tokenizer = config.inputs.tokenizer if tokenizer is None else tokenizer
    if tokenizer is None:  # saved beside the model; where calibration needs one and none loads, the pipeline says so
        tokenizer = find_tokenizer(source)
        if tokenizer is None:
            logger.warning("no tokenizer loads from %s; none is saved with the compressed model", source)
    config = config.with_inputs(tokenizer=tokenizer)  # a copy: compression writes the allocation into it
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    model.name_or_path = str(source)
    model.eval()
    writes = Ranks().writes
    with staged_output(output, overwrite) if writes else contextlib.nullcontext() as staging:
        streamed = StreamedBlocks(model, reader, staging, dtype, device)

        def start(blocks: list[tuple[str, nn.Module]]) -> list[str]:
            streamed.shards = len(blocks) + 1
            rest = streamed.outside_blocks([name for name, _ in blocks])
            streamed.materialise(rest)
            model.tie_weights()
            return rest

        with _scratch(output, config) as scratch:
            rest = compress_blocks(model, config, streamed, start, scratch)
        streamed.finish(rest)
        if not writes:
            return output
        model.config.quantization_config = config
        mark_compressed(model)
        model.config.save_pretrained(staging)
        try:
            GenerationConfig.from_pretrained(source).save_pretrained(staging)
        except OSError:
            pass  # the source has no generation_config.json
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(staging)
        write_card(model, staging)
    logger.info("wrote the compressed checkpoint to %s", output)
    return output
