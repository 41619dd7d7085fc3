"""Read PyTorch ``.pth`` checkpoints without torch and without running code from the file.

``torch.save`` (since torch 1.6) writes a zip holding ``<archive>/data.pkl``, a pickle of the
saved object, and one uncompressed member ``<archive>/data/<key>`` per tensor storage. The
pickle names storages by persistent id and rebuilds tensors by calling ``torch._utils``
functions. A pickle may call any global, so a downloaded checkpoint could run arbitrary code
on load; the unpickler below admits only the few globals that plain state dicts hold and
maps each to a local stand-in. Tensors come back as :class:`LazyTensor`, whose bytes are read
only by ``LazyTensor.load()`` - a 7 GB checkpoint can be converted one tensor at a time.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np


class UnsafeCheckpointError(ValueError):
    """The checkpoint's pickle asks for a global that a plain state dict never needs."""


@dataclasses.dataclass(frozen=True)
class _Storage:
    """Where one storage's bytes live: member ``name`` of the zip file at ``path``."""

    path: str
    name: str
    header_offset: int  # of the member's local zip header
    nbytes: int
    dtype: np.dtype


# A zip local file header: signature, 22 bytes we skip, file name length, extra field length.
_LOCAL_HEADER = struct.Struct("<4s22xHH")


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """One tensor of the checkpoint, not yet read: a strided view into a storage."""

    shape: tuple[int, ...]
    dtype: np.dtype
    storage: _Storage = dataclasses.field(repr=False)
    offset: int = dataclasses.field(repr=False)  # in elements, as torch counts it
    stride: tuple[int, ...] = dataclasses.field(repr=False)  # in elements

    def _span(self) -> int:
        """Elements from ``offset`` up to and including the last one the view addresses."""
        if 0 in self.shape:
            return 0
        return 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride))

    def load(self) -> np.ndarray:
        """Read this tensor's bytes, and only those, and return them as a C-contiguous array."""
        s, itemsize = self.storage, self.dtype.itemsize
        buf = bytearray(self._span() * itemsize)
        with open(s.path, "rb") as f:
            # The member's data starts after its local header, whose name and extra field
            # lengths may differ from the central directory's, so read them here.
            f.seek(s.header_offset)
            head = f.read(_LOCAL_HEADER.size)
            if len(head) < _LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
                raise ValueError(
                    f"{s.path}: corrupt: no zip header for member {s.name} (was the file changed after load_pth?)"
                )
            _, name_len, extra_len = _LOCAL_HEADER.unpack(head)
            f.seek(s.header_offset + len(head) + name_len + extra_len + self.offset * itemsize)
            got = f.readinto(buf)
        if got < len(buf):
            raise ValueError(
                f"{s.path}: truncated: member {s.name} has {self.offset * itemsize + got} of {s.nbytes} bytes"
            )
        flat = np.frombuffer(buf, self.dtype)
        view = np.lib.stride_tricks.as_strided(flat, self.shape, [st * itemsize for st in self.stride])
        # Non-contiguous views (transposes, expands) get their own compact copy.
        return view if view.flags.c_contiguous else view.copy()


def _tensor(storage, offset, shape, stride, dtype, metadata):
    """Check a tensor's geometry against its storage, so ``load`` never reads out of bounds."""
    if not isinstance(storage, _Storage) or not isinstance(dtype, np.dtype):
        raise ValueError("tensor without a storage or dtype")
    if metadata:  # conjugate / negative bits, never set on real-valued tensors
        raise ValueError(f"unsupported tensor metadata {metadata!r}")
    shape, stride = tuple(shape), tuple(stride)
    if len(shape) != len(stride) or not all(type(v) is int and v >= 0 for v in (offset, *shape, *stride)):
        raise ValueError(f"bad tensor geometry: offset {offset}, shape {shape}, stride {stride}")
    tensor = LazyTensor(shape, dtype, storage, offset, stride)
    if (offset + tensor._span()) * dtype.itemsize > storage.nbytes:
        raise ValueError(f"tensor of shape {shape} overruns member {storage.name} ({storage.nbytes} bytes)")
    return tensor


# Stand-ins for the torch functions that data.pkl calls to rebuild tensors and parameters.
def _rebuild_tensor_v2(storage, offset, shape, stride, requires_grad, hooks, metadata=None):
    return _tensor(storage, offset, shape, stride, getattr(storage, "dtype", None), metadata)


def _rebuild_tensor_v3(storage, offset, shape, stride, requires_grad, hooks, dtype, metadata=None):
    return _tensor(storage, offset, shape, stride, dtype, metadata)


def _rebuild_parameter(data, requires_grad, hooks):
    return data  # a Parameter is just its tensor here


# Legacy storage classes, each standing for its element type.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
# Dtypes newer than the legacy storage classes: torch.save writes these tensors as bytes (an
# UntypedStorage) plus a ``torch.<dtype>`` global, rebuilt by _rebuild_tensor_v3.
_TORCH_DTYPES = {
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
}
# Everything the unpickler may name. None of these is callable except the stand-ins above,
# OrderedDict and Namespace (whose constructors only store what they are given).
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,  # the Lumina trainer's saved args
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "UntypedStorage"): np.dtype(np.uint8),
    **{("torch", name): np.dtype(t) for name, t in (_STORAGE_DTYPES | _TORCH_DTYPES).items()},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, zf: zipfile.ZipFile, path: str, archive: str):
        super().__init__(io.BytesIO(data))
        self._zf, self._path, self._archive = zf, path, archive
        self._storages: dict[str, _Storage] = {}  # tensors sharing a storage share its record

    def find_class(self, module, name):
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._path}: refusing to load global '{module}.{name}': a plain checkpoint "
                "holds only tensors, dicts, lists and argparse.Namespace, and unpickling "
                "anything else could run code from the file"
            ) from None

    def persistent_load(self, pid):
        # torch.save writes ('storage', storage type, key, location, number of elements).
        typename, dtype, key, _location, numel = pid
        if (
            typename != "storage"
            or not isinstance(dtype, np.dtype)
            or not isinstance(key, str)
            or type(numel) is not int
        ):
            raise ValueError(f"unknown persistent id {pid!r}")
        if key not in self._storages:
            name = f"{self._archive}/data/{key}"
            try:
                info = self._zf.getinfo(name)
            except KeyError:
                raise ValueError(f"missing member {name}") from None
            nbytes = numel * dtype.itemsize
            if info.file_size < nbytes:
                raise ValueError(f"truncated: member {name} has {info.file_size} of {nbytes} bytes")
            # load() reads the raw bytes straight from the file, which needs them uncompressed.
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(
                    f"member {name} is compressed; torch.save never compresses "
                    "storages, so re-save the checkpoint with torch.save"
                )
            self._storages[key] = _Storage(self._path, name, info.header_offset, nbytes, dtype)
        return self._storages[key]


# The pickled magic number that starts the legacy (pre-1.6, non-zip) torch.save format.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def load_pth(path) -> object:
    """Unpickle a torch.save zip checkpoint, replacing every tensor by a :class:`LazyTensor`.

    Dicts, OrderedDicts, lists, tuples and argparse.Namespace objects are kept as they are.
    No tensor data is read.
    """
    path = os.fspath(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
        if head == _LEGACY_MAGIC:
            raise ValueError(
                f"{path}: legacy (pre-1.6, non-zip) torch.save format is not supported; "
                "re-save it with a current torch, where you trust the file: "
                "torch.save(torch.load(path, weights_only=True), new_path)"
            ) from None
        if head.startswith(b"PK"):
            raise ValueError(f"{path}: truncated or corrupt zip ({e})") from None
        raise ValueError(f"{path}: not a PyTorch zip checkpoint ({e})") from None
    with zf:
        names = zf.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pickles:
            raise ValueError(f"{path}: not a PyTorch zip checkpoint (no <archive>/data.pkl)")
        archive = pickles[0].split("/")[0]
        try:
            # Older torch wrote no byteorder record; such files are little endian in practice.
            order_name = f"{archive}/byteorder"
            byteorder = zf.read(order_name).decode() if order_name in names else "little"
            if byteorder != "little":
                raise ValueError(
                    f"byteorder is {byteorder!r}; only little-endian checkpoints "
                    "are supported (re-save it on a little-endian machine)"
                )
            return _Unpickler(zf.read(pickles[0]), zf, path, archive).load()
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # pickle reports corrupt data with many exception types
            raise ValueError(f"{path}: cannot read checkpoint: {e}") from e
