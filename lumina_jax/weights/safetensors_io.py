"""Streaming reads of safetensors files, single or sharded with an index.

A small reader of our own rather than `safetensors.safe_open(framework="numpy")`, which cannot
return bfloat16 tensors: the header is parsed once and each tensor is a memory-mapped view, read
only when loaded. A truncated or corrupt file is an error that names it.
"""

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsTensor:
    """One tensor of a safetensors file, not yet read."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, start: int, end: int):
        self.path, self.shape, self.dtype, self._start, self._end = path, shape, dtype, start, end

    def load(self) -> np.ndarray:
        data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._start, shape=(self._end - self._start,))
        return np.asarray(data.view(self.dtype).reshape(self.shape))


def _read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header, checked, and the length of that header in bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise ValueError(
                f"{path}: corrupt or truncated safetensors file (header of {header_len} bytes, file {size})"
            )
        try:
            return json.loads(f.read(header_len)), header_len
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's `__metadata__` strings (empty where it has none)."""
    return _read_header(Path(path))[0].get("__metadata__") or {}


def read_safetensors(path: str | os.PathLike) -> dict[str, SafetensorsTensor]:
    """The tensors of one file, by name, without reading their data."""
    path = Path(path)
    size = path.stat().st_size
    header, header_len = _read_header(path)
    data_start = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors header entry for {name!r}: {info}") from None
        if end - begin != dtype.itemsize * int(np.prod(shape)):
            raise ValueError(f"{path}: tensor {name!r} {shape} {info['dtype']} does not fit its {end - begin} bytes")
        if data_start + end > size:
            raise ValueError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + end}, the file has {size} bytes"
            )
        tensors[name] = SafetensorsTensor(path, shape, dtype, data_start + begin, data_start + end)
    return tensors


def read_safetensors_folder(folder: Path, stem: str) -> dict[str, SafetensorsTensor]:
    """`stem.safetensors`, or the shards listed by `stem.safetensors.index.json`."""
    index = folder / f"{stem}.safetensors.index.json"
    if not index.exists():
        return read_safetensors(folder / f"{stem}.safetensors")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{index}: not a safetensors index ({e!r})") from None
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).exists():
            raise FileNotFoundError(f"{index} lists shard {shard}, which is missing from {folder}")
        tensors.update(read_safetensors(folder / shard))
    listed, found = set(weight_map), set(tensors)
    if listed != found:
        raise ValueError(
            f"{index} does not match its shards: listed but absent {sorted(listed - found)[:10]}, "
            f"present but unlisted {sorted(found - listed)[:10]}"
        )
    return tensors


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write tensors (bfloat16 included) in the safetensors format, header first (with `metadata`, text by
    text key, where given), then the data."""
    names = {np.dtype(v): k for k, v in _DTYPES.items()}
    header, offset = ({"__metadata__": metadata} if metadata else {}), 0
    for name, array in tensors.items():
        header[name] = {
            "dtype": names[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())
