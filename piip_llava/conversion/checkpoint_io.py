"""Read a released checkpoint's weight files and write ours, one shard at a time.

Released checkpoints hold `model*.safetensors` or `pytorch_model*.bin` files, sharded with an
index json or single. `.bin` files are opened with `torch.load(weights_only=True)` (tensors and
plain containers only: nothing in the file is executed) and memory-mapped, so a 13B checkpoint
converts shard by shard without holding it whole in memory.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def find_weight_files(checkpoint_dir: str) -> list[str]:
    """The checkpoint's weight files in a stable order; safetensors preferred when both exist."""
    for index_name, pattern in ((SAFETENSORS_INDEX, "model*.safetensors"), (BIN_INDEX, "pytorch_model*.bin")):
        index_path = os.path.join(checkpoint_dir, index_name)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as handle:
                weight_map = json.load(handle)["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [name for name in files if not os.path.isfile(os.path.join(checkpoint_dir, name))]
            if missing:
                raise FileNotFoundError(f"{index_path} lists shards that are not in {checkpoint_dir}: {missing}")
            return [os.path.join(checkpoint_dir, name) for name in files]
        files = sorted(glob.glob(os.path.join(checkpoint_dir, pattern)))
        if files:
            return files
    raise FileNotFoundError(
        f"No weights in {checkpoint_dir}: expected model*.safetensors or pytorch_model*.bin (with an index json when "
        f"sharded)."
    )


def _load_bin(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{path} is not a flat state dict of tensors.")
    return state


def read_shapes(files: list[str]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, without reading safetensors data."""
    shapes = {}
    for path in files:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as handle:
                names = handle.keys()  # a safetensors handle is not iterable itself
                shapes.update({name: tuple(handle.get_slice(name).get_shape()) for name in names})
        else:
            shapes.update({name: tuple(tensor.shape) for name, tensor in _load_bin(path).items()})
    return shapes


def iter_tensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, file by file."""
    for path in files:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as handle:
                names = handle.keys()
                for name in names:
                    yield name, handle.get_tensor(name)
        else:
            yield from _load_bin(path).items()


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB" or "500MB"."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for suffix, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


class ShardWriter:
    """Writes tensors into `model-0000k-of-0000n.safetensors` shards plus the index json."""

    def __init__(self, output_dir: str, max_shard_bytes: int):
        self.output_dir = output_dir
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str]]] = []  # (temporary file, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        # Own storage: views into a larger (memory-mapped or shared) storage cannot be saved as is.
        if tensor.untyped_storage().nbytes() != size or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        path = os.path.join(self.output_dir, f"model-part-{len(self.written) + 1:05d}.safetensors.tmp")
        save_file(self.pending, path, metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Give the shards their final names (single file or numbered + index); returns the file names."""
        self.flush()
        if len(self.written) == 1:
            final = os.path.join(self.output_dir, "model.safetensors")
            os.replace(self.written[0][0], final)
            return ["model.safetensors"]
        count = len(self.written)
        weight_map, names = {}, []
        for number, (path, tensors) in enumerate(self.written, start=1):
            name = f"model-{number:05d}-of-{count:05d}.safetensors"
            os.replace(path, os.path.join(self.output_dir, name))
            weight_map.update({tensor: name for tensor in tensors})
            names.append(name)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.output_dir, SAFETENSORS_INDEX), "w", encoding="utf-8") as handle:
            json.dump(index, handle, indent=2)
        return names


__all__ = ["ShardWriter", "find_weight_files", "iter_tensors", "parse_size", "read_shapes"]
