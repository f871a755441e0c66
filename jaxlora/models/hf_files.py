"""Files of a Hugging Face checkpoint directory: where it is, its config.json, which safetensors file
holds which key, and reading one tensor at a time.

`TensorReader` reads a tensor with plain file reads into a fresh array rather than through safetensors'
memory map: a mapped checkpoint's pages stay resident in the process (RSS) as long as the file is
open, so a single-file checkpoint would cost its full size in RSS whatever the loader keeps.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from jaxlora.models.config import LlamaConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype tags -> numpy (the format is little-endian)
_NP_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
              "BF16": np.dtype(ml_dtypes.bfloat16), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
              "I32": np.dtype("<i4"), "I64": np.dtype("<i8"), "BOOL": np.dtype(bool)}


def resolve(path_or_id: str | os.PathLike, revision: str | None) -> Path:
    """A local checkpoint directory: `path_or_id` itself, or a hub snapshot when it is no local path."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists() or text.startswith(("/", ".", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"{text}: no such checkpoint directory")
    try:
        from huggingface_hub import snapshot_download  # optional ("train" extra); only for hub ids
    except ImportError as e:
        raise FileNotFoundError(f"{text}: not a local directory, and huggingface_hub is not installed") from e
    patterns = ["config.json", "*.safetensors", INDEX_FILE]
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo: all mean "no checkpoint here"
        raise FileNotFoundError(f"{text}: not a local directory, and the hub download failed ({e})") from e


def load_config(directory: str | os.PathLike) -> LlamaConfig:
    """Reads ``config.json`` of a checkpoint directory."""
    file = Path(directory) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a Hugging Face checkpoint directory needs a config.json")
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    try:
        return LlamaConfig.from_hf_dict(d)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{file}: {e}") from e


def weight_files(directory: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file holding it, from the headers alone."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = _weight_map(index)
        files = sorted({directory / f for f in weight_map.values()})
    elif (directory / SINGLE_FILE).is_file():
        files = [directory / SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found "
                                "(only safetensors checkpoints are read)")
    where: dict[str, Path] = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file}: listed in {INDEX_FILE} but missing")
        with open_safetensors(file) as f:
            for key in f.keys():
                if key in where:
                    raise ValueError(f"{key}: in both {where[key].name} and {file.name}")
                where[key] = file
    if index.is_file():
        absent = sorted(set(weight_map) - set(where))
        if absent:
            raise ValueError(f"{index}: keys listed but in no shard: {absent[:5]}")
    return where


def _weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` (key -> shard file name) of a sharded checkpoint's index."""
    try:
        data = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{index}: not valid JSON ({e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: needs a \"weight_map\" object of tensor name -> shard file name, got "
                         f"{type(weight_map).__name__ if isinstance(data, dict) else type(data).__name__}")
    return weight_map


def open_safetensors(file: Path):
    try:
        return safe_open(file, framework="np")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: corrupt or truncated safetensors file ({e})") from e


class TensorReader:
    """Reads tensors of one safetensors file by key (``with TensorReader(file) as r: r.read(key)``)."""

    def __init__(self, file: Path):
        self.file = file
        self._fh = open(file, "rb")
        try:
            (n,) = struct.unpack("<Q", self._fh.read(8))
            self._header = json.loads(self._fh.read(n))
        except (struct.error, ValueError) as e:
            self._fh.close()
            raise ValueError(f"{file}: corrupt or truncated safetensors file ({e})") from e
        self._start = 8 + n

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()

    def keys(self) -> list[str]:
        return [k for k in self._header if k != "__metadata__"]

    def read(self, key: str) -> np.ndarray:
        info = self._header[key]
        dtype = _NP_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{self.file}: {key} has dtype {info['dtype']}, which jaxlora does not read")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        self._fh.seek(self._start + begin)
        array = np.fromfile(self._fh, dtype=dtype, count=(end - begin) // dtype.itemsize)
        if array.size != int(np.prod(shape)) or (end - begin) != array.nbytes:
            raise ValueError(f"{self.file}: cannot read {key}, corrupt or truncated")
        return array.reshape(shape)
