"""A Hugging Face safetensors checkpoint on disk: read one tensor at a time, write one in shards.

Block-by-block pruning never holds a whole model: :class:`Checkpoint` reads the tensors of one
block from the shards (safetensors, never unpickled), :class:`ShardWriter` writes the slim
tensors as they come into HF-named shards with an index, and :func:`finish_checkpoint` adds what
lies outside the blocks, the config and the tokenizer files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmrank.ir.errors import InputError
from llmrank.passes.slimconfig import config_for_save

INDEX_NAME = "model.safetensors.index.json"
#: Files copied next to the slim weights when the source folder has them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json")

class Checkpoint:
    """A local safetensors checkpoint, read one tensor at a time (never unpickles)."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise InputError(f"{self.folder} has no config.json: not a Hugging Face model folder")
        index = self.folder / INDEX_NAME
        if index.exists():
            self.weight_map: dict[str, str] = _read_index(index)
        elif (self.folder / "model.safetensors").is_file():
            self.weight_map = {k: "model.safetensors" for k in _shard_keys(self.folder / "model.safetensors")}
        else:
            raise InputError(f"{self.folder} has no model.safetensors or {INDEX_NAME}: block-by-block pruning reads "
                             "safetensors checkpoints only (save the model with save_pretrained(safe_serialization=True))")

    @property
    def files(self) -> list[Path]:
        return [self.folder / name for name in sorted(set(self.weight_map.values()))]

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    def read(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """The tensors of ``keys``, opening each shard once."""
        from safetensors import safe_open

        missing = [k for k in keys if k not in self.weight_map]
        if missing:
            raise InputError(f"{self.folder} lacks the tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}: "
                             "the checkpoint does not match its config.json")
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.weight_map[k], []).append(k)
        out: dict[str, torch.Tensor] = {}
        for name, names in by_file.items():
            path = self.folder / name
            try:
                with safe_open(str(path), framework="pt") as f:
                    held = set(f.keys())
                    absent = [k for k in names if k not in held]
                    if absent:
                        raise InputError(f"{self.folder / INDEX_NAME} maps {absent[0]} to {name}, which does not hold it: "
                                         "fix the index or save the model again with save_pretrained")
                    for k in names:
                        out[k] = f.get_tensor(k)
            except InputError:
                raise
            except Exception as exc:  # noqa: BLE001 - safetensors' own error names no file
                raise InputError(f"{path} cannot be read as safetensors ({type(exc).__name__}: {exc})") from None
        return out

    def dtype(self) -> torch.dtype:
        """The dtype that holds most of the checkpoint's floating-point elements (a checkpoint may
        mix them, e.g. fp32 blocks with an fp16 embedding: the first tensor does not speak for all)."""
        counts: dict[torch.dtype, int] = {}
        for dtype, numel in self._floating().values():
            counts[dtype] = counts.get(dtype, 0) + numel
        return max(counts, key=lambda d: (counts[d], d.itemsize)) if counts else torch.float32

    def dtypes(self) -> set[torch.dtype]:
        """Every floating dtype the checkpoint stores."""
        return {dtype for dtype, _ in self._floating().values()}

    def dtype_of(self, key: str, default: torch.dtype) -> torch.dtype:
        """The dtype ``key`` is stored in (``default`` for a tensor the checkpoint does not have)."""
        found = self._floating().get(key)
        return found[0] if found is not None else default

    def _floating(self) -> dict[str, tuple[torch.dtype, int]]:
        """key -> (dtype, element count) of every floating tensor, read from the shard headers once."""
        cached = getattr(self, "_floating_cache", None)
        if cached is not None:
            return cached
        from safetensors import safe_open

        out: dict[str, tuple[torch.dtype, int]] = {}
        for path in self.files:
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    t = f.get_slice(k)
                    dtype = _DTYPES.get(t.get_dtype())
                    if dtype is not None:
                        out[k] = (dtype, math.prod(t.get_shape()))
        self._floating_cache = out
        return out


def _read_index(index: Path) -> dict[str, str]:
    """The index's weight_map, each shard checked to exist; every fault names the file."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{index} cannot be read as JSON ({type(exc).__name__}: {exc}): save the model again "
                         "with save_pretrained") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index} has no \"weight_map\" object (tensor name -> shard file): save the model again "
                         "with save_pretrained")
    missing = sorted({v for v in weight_map.values() if not (index.parent / v).is_file()})
    if missing:
        raise InputError(f"{index} names shard file(s) that {index.parent} does not hold: {', '.join(missing[:3])}")
    return dict(weight_map)


def _shard_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # noqa: BLE001 - safetensors' own error names no file
        raise InputError(f"{path} cannot be read as safetensors ({type(exc).__name__}: {exc})") from None


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def fp32_size(folder: Path | str) -> int:
    """Bytes the checkpoint takes in memory as fp32 (the in-memory prune's working precision)."""
    ckpt = Checkpoint(folder)
    from safetensors import safe_open

    total = 0
    for path in ckpt.files:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                total += 4 * math.prod(f.get_slice(k).get_shape())
    return total


class ShardWriter:
    """Writes tensors into ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_bytes``
    as they come, and the HF index at the end.

    No tensor waits in memory for its shard: each one's bytes go at once to the open shard's
    data file, and closing the shard writes the safetensors header and appends those bytes
    from disk. Held shards cost a whole shard of RSS on top of the block being pruned (up to
    2 GiB at 8B scale, still 256 MB when closed early), and serialising a shard a second copy.
    """

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder, self.limit = folder, max_shard_bytes
        self.entries: dict[str, dict[str, Any]] = {}  # the open shard's header: name -> dtype, shape, byte range
        self.data: Any = None  # the open shard's data file
        self.size = 0  # bytes in the open shard
        self.parts: list[list[str]] = []
        self.total = 0

    def _data_path(self) -> Path:
        return self.folder / f"part-{len(self.parts):05d}.data"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        size = t.numel() * t.element_size()
        if self.entries and self.size + size > self.limit:
            self.flush()
        if self.data is None:
            self.data = open(self._data_path(), "wb")
        self.entries[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [self.size, self.size + size]}
        if size:
            self.data.write(tensor_bytes(t))
        self.size += size
        self.total += size

    def flush(self) -> None:
        """Close the open shard: its header, then its data."""
        if self.data is None:
            return
        self.data.close()
        source = self._data_path()
        with open(self.folder / f"part-{len(self.parts):05d}.safetensors", "wb") as f:
            f.write(safetensors_header(self.entries, {"format": "pt"}))
            with open(source, "rb") as data:
                shutil.copyfileobj(data, f, 16 * 1024**2)
        source.unlink()
        self.parts.append(list(self.entries))
        self.entries, self.data, self.size = {}, None, 0

    def close(self) -> list[str]:
        """Rename the parts to the HF names and write the index; returns the shard names."""
        self.flush()
        n = len(self.parts)
        names = []
        weight_map: dict[str, str] = {}
        for i, keys in enumerate(self.parts):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f"part-{i:05d}.safetensors", self.folder / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return names


_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
          torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def safetensors_header(entries: dict[str, dict[str, Any]], metadata: dict[str, str]) -> bytes:
    """The safetensors preamble: an 8-byte little-endian length, then the JSON header (each
    tensor's dtype, shape and byte range in the data that follows) padded to 8 bytes."""
    text = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous tensor's bytes as stored by safetensors (little-endian), without a copy."""
    if sys.byteorder != "little":  # pragma: no cover - every platform torch ships wheels for is little-endian
        raise NotImplementedError("writing safetensors shards needs a little-endian machine")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def finish_checkpoint(folder: Path, writer: ShardWriter, ckpt: Checkpoint, model: nn.Module, layer_prefix: str,
                      out_dtype: torch.dtype, metadata: dict[str, Any]) -> None:
    """The tensors outside the blocks (``layer_prefix``; copied as they are), the index, a config
    describing the slim widths of ``model`` (``slimconfig`` conventions, with ``metadata``)
    and the tokenizer files."""
    for key in sorted(k for k in ckpt.weight_map if not k.startswith(layer_prefix)):
        writer.add(key, ckpt.read([key])[key])  # on disk at once: one embedding matrix in memory at a time
    saved_config, _, _, _, zeros = config_for_save(model, metadata)
    for key, z in zeros.items():  # biases the config's switch now declares: zeros, so stock loading builds the same model
        writer.add(key, torch.zeros(z.shape, dtype=out_dtype))
    writer.close()
    saved_config.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (ckpt.folder / name).is_file():
            shutil.copy2(ckpt.folder / name, folder / name)
