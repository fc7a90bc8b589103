"""Read a PyTorch ``.pth`` state dict into NumPy arrays without PyTorch, building only arrays.

Both formats ``torch.save`` has written are read: the zip archive (PyTorch
1.6 and later: ``<archive>/data.pkl`` plus one record per storage) and the
legacy stream (earlier versions, in which most published research weights are
kept: magic number, protocol, system info, the pickle, its storage keys, then
each storage's element count and bytes). The pickle is read by an unpickler
that admits only what a state dict holds (dicts, ``OrderedDict``, tensors
rebuilt from storages, numbers, strings), the same rule as
``torch.load(weights_only=True)``: a file holding pickled code (a whole model)
is refused, never run. Tensors become NumPy arrays with their shape, strides
and offset into the storage honoured.

Why without PyTorch: the published weights can then be converted on the
quick-start install (no PyTorch: 192 MB download and 0.9 GB installed less,
and no 1.5 s ``import torch``); see the README's "Real models".
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile

import numpy as np

from jaxdissect.errors import JaxDissectError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch.<Name>Storage -> NumPy dtype (bfloat16 is widened to float32 on reading).
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}  # fmt: skip


class TorchFileError(JaxDissectError, ValueError):
    """A file that is not a readable PyTorch state dict; the message says why and what to do."""


class PickledCodeError(TorchFileError):
    """The file holds pickled objects other than tensors (e.g. a whole model): reading it would run code."""


class _Storage:
    """A storage's place in the file: read lazily, once, by :meth:`array`."""

    def __init__(self, dtype_name: str, key: str, numel: int):
        self.dtype_name, self.key, self.numel = dtype_name, key, int(numel)
        self.data: np.ndarray | None = None

    @property
    def dtype(self):
        raw = STORAGE_DTYPES[self.dtype_name]
        return np.dtype(np.uint16) if raw == "bfloat16" else np.dtype(raw)


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

    def array(self) -> np.ndarray:
        base = self.storage.data
        item = base.dtype.itemsize
        if self.size and min(self.size) == 0:
            out = np.zeros(self.size, base.dtype)
        else:
            last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
            if self.offset < 0 or last >= base.size:
                raise TorchFileError(f"a tensor reaches past its storage ({last + 1} > {base.size} elements): "
                                     "the file is truncated or corrupt; download it again")
            n = int(np.prod(self.size, dtype=np.int64))
            if self.stride == _contiguous_strides(self.size):  # the usual case: a view, no copy
                out = base[self.offset:self.offset + n].reshape(self.size)
            else:
                out = np.lib.stride_tricks.as_strided(base[self.offset:], self.size,
                                                      tuple(s * item for s in self.stride)).copy()
        if STORAGE_DTYPES[self.storage.dtype_name] == "bfloat16":
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out


def _contiguous_strides(size) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= max(int(n), 1)
    return tuple(reversed(strides))


def _rebuild_tensor_v2(storage, offset, size, stride, *unused):
    return _Tensor(storage, offset, size, stride)


def _rebuild_tensor(storage, offset, size, stride):
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
    return data


class _StorageType:
    def __init__(self, name):
        self.name = name


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    """Admits only state-dict contents; records each storage it meets."""

    def __init__(self, f, path: str):
        super().__init__(f, encoding="latin1")
        self.path = path
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise PickledCodeError(
            f"{self.path} holds a pickled object {module}.{name}, not only tensors (e.g. a whole pickled "
            "model); it cannot be read without running its code. Re-save it as a state dict where it loads: "
            "model = torch.load(path, weights_only=False); torch.save(model.state_dict(), 'model_state.pth')")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and _text(pid[0]) == "storage" and len(pid) in (5, 6)):
            raise TorchFileError(f"{self.path}: unknown record {pid!r} in the pickle; not a PyTorch state dict")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise TorchFileError(f"{self.path}: storage of unsupported type {storage_type!r}")
        key = _text(key)
        storage = self.storages.setdefault(key, _Storage(storage_type.name, key, numel))
        view = pid[5] if len(pid) == 6 else None
        if view is not None:  # legacy views into a larger storage: (view key, offset, size)
            _, offset, size = view
            return _View(storage, int(offset), int(size))
        return storage


class _View(_Storage):
    def __init__(self, root: _Storage, offset: int, size: int):
        self.root, self.view_offset, self.view_size = root, offset, size
        self.dtype_name, self.key, self.numel = root.dtype_name, root.key, size

    @property
    def data(self):
        return self.root.data[self.view_offset:self.view_offset + self.view_size]


def _text(value) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _materialise(obj, path: str):
    """Replace every tensor record in ``obj`` by its NumPy array."""
    if isinstance(obj, _Tensor):
        return obj.array()
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v, path)) for k, v in obj.items()) if isinstance(
            obj, collections.OrderedDict) else {k: _materialise(v, path) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v, path) for v in obj)
    return obj


def _read_zip(path: str):
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise TorchFileError(f"{path} is a zip archive but not a PyTorch checkpoint (no <archive>/data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        order = "little"
        if prefix + "byteorder" in names:
            order = z.read(prefix + "byteorder").decode("ascii").strip()
        unpickler = _Unpickler(io.BytesIO(z.read(pkl[0])), path)
        obj = unpickler.load()
        for key, storage in unpickler.storages.items():
            raw = z.read(f"{prefix}data/{key}")
            storage.data = _frombuffer(raw, storage, order, path)
    return obj


def _frombuffer(raw: bytes, storage: _Storage, order: str, path: str) -> np.ndarray:
    dtype = storage.dtype.newbyteorder("<" if order == "little" else ">")
    if len(raw) < storage.numel * dtype.itemsize:
        raise TorchFileError(f"{path}: storage {storage.key} holds {len(raw)} bytes, needs "
                             f"{storage.numel * dtype.itemsize}; the file is truncated or corrupt; download it again")
    return np.frombuffer(raw, dtype, storage.numel).astype(dtype.newbyteorder("="), copy=False)


def _read_legacy(path: str):
    with open(path, "rb") as f:
        try:
            magic = pickle.load(f)
            protocol = pickle.load(f)
            pickle.load(f)  # system info: {'protocol_version', 'little_endian', 'type_sizes'}
        except Exception as e:
            raise TorchFileError(f"cannot read {path} as a PyTorch checkpoint, zip or legacy ({e}); the file may "
                                 "be truncated or corrupt: download it again") from None
        if magic != LEGACY_MAGIC or protocol != LEGACY_PROTOCOL:
            raise TorchFileError(f"{path} is not a PyTorch checkpoint (wrong magic number or protocol)")
        unpickler = _Unpickler(f, path)
        obj = unpickler.load()
        keys = [_text(k) for k in pickle.load(f)]
        for key in keys:
            storage = unpickler.storages.get(key)
            head = f.read(8)
            if storage is None or len(head) != 8:
                raise TorchFileError(f"{path}: storage {key} is missing: the file is truncated or corrupt; "
                                     "download it again")
            (numel,) = struct.unpack("<q", head)
            storage.numel = numel
            storage.data = np.fromfile(f, storage.dtype.newbyteorder("<"), numel)
            if storage.data.size != numel:
                raise TorchFileError(f"{path}: storage {key} is short: the file is truncated or corrupt; download it again")
    return obj


def load(path: str):
    """The object saved in ``path`` with every tensor as a NumPy array (bfloat16 widened to float32).

    Raises :class:`PickledCodeError` for a file that holds pickled code and
    :class:`TorchFileError` for anything else that is not a readable checkpoint.
    """
    if not os.path.isfile(path):
        raise TorchFileError(f"checkpoint file {path} does not exist")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if zipfile.is_zipfile(path):
            obj = _read_zip(path)
        elif head == b"PK\x03\x04":
            raise TorchFileError(f"{path} is a zip archive without its end (central directory): the file is "
                                 "truncated or corrupt; download it again")
        else:
            obj = _read_legacy(path)
    except TorchFileError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError, ValueError, struct.error) as e:
        raise TorchFileError(f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {e}); the file "
                             "may be truncated or corrupt: download it again") from None
    return _materialise(obj, path)
