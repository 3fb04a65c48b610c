"""Reads PyTorch `.pth` state dicts into numpy arrays without importing torch.

Both of `torch.save`'s formats: the zip archive (torch >= 1.6: `data.pkl` plus
one raw file per storage) and the legacy stream (pickles, then each storage as
an int64 element count and raw bytes). Only tensors, containers and plain
values are unpickled; any other global is refused, as torch's weights_only
(`RefusedPickleError`, naming the file).
"""
import collections
import io
import pickle
import struct
import sys
import zipfile
from typing import Any, Dict

import ml_dtypes
import numpy as np

from jaxsd import errors

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32,
    "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


class _StorageType:
  def __init__(self, name):
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """A storage named in the pickle; its bytes are attached later."""

  def __init__(self, dtype, key, numel):
    self.dtype, self.key, self.numel = dtype, key, numel
    self.array = None  # flat np.ndarray once read


class _StorageView:
  """Legacy format: a storage that is a slice of a root storage."""

  def __init__(self, root, offset, numel):
    self.root, self.offset, self.numel = root, offset, numel

  @property
  def array(self):
    return self.root.array[self.offset:self.offset + self.numel]


class _Tensor:
  """A tensor recorded while unpickling, materialised once storages are read."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset = storage, offset
    self.size, self.stride = tuple(size), tuple(stride)

  def to_numpy(self) -> np.ndarray:
    flat = self.storage.array
    if not self.size:
      return np.array(flat[self.offset])
    needed = self.offset + 1 + sum((n - 1) * s
                                   for n, s in zip(self.size, self.stride))
    if any(n == 0 for n in self.size):
      return np.zeros(self.size, flat.dtype)
    if needed > flat.size:
      raise ValueError(f"tensor {self.size} overruns its storage")
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], self.size, [s * itemsize for s in self.stride])
    return np.array(view)  # copy: own memory, C order


def _rebuild_tensor_v2(storage, storage_offset, size, stride,
                       requires_grad=False, backward_hooks=None,
                       metadata=None):
  del requires_grad, backward_hooks, metadata
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None,
                       state=None):
  del requires_grad, backward_hooks, state
  return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _Refused(pickle.UnpicklingError):
  """A global or persistent id the unpicklers do not allow (the file's path
  is added by load_torch_file)."""


class _Unpickler(pickle.Unpickler):
  """Resolves torch's globals to the stand-ins above; refuses all others."""

  def __init__(self, file, storages: Dict[str, _Storage]):
    super().__init__(file)
    self.storages = storages

  def find_class(self, module, name):
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[module, name]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise _Refused(f"refusing to unpickle {module}.{name}")

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or pid[0] != "storage":
      raise _Refused(f"refusing to unpickle the persistent id {pid!r}")
    storage_type, key, _location, numel = pid[1:5]
    key = str(key)
    if key not in self.storages:
      self.storages[key] = _Storage(storage_type.dtype, key, numel)
    storage = self.storages[key]
    view_metadata = pid[5] if len(pid) > 5 else None
    if view_metadata is not None:  # legacy: (view_key, offset, view_numel)
      _view_key, offset, view_numel = view_metadata
      return _StorageView(storage, offset, view_numel)
    return storage


def _materialise(obj: Any) -> Any:
  if isinstance(obj, _Tensor):
    return obj.to_numpy()
  if isinstance(obj, dict):
    out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _materialise(v)
    return out
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v) for v in obj)
  return obj


def _from_bytes(raw: bytes, dtype: np.dtype, little_endian: bool):
  array = np.frombuffer(raw, dtype).copy()
  if little_endian != (sys.byteorder == "little"):
    array = array.byteswap()
  return array


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("data.pkl")]
    if not pickles:
      raise ValueError(f"{path}: zip without data.pkl, not a torch file")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = archive.read(prefix + "byteorder").decode().strip()
    storages: Dict[str, _Storage] = {}
    obj = _Unpickler(io.BytesIO(archive.read(pickles[0])), storages).load()
    for key, storage in storages.items():
      raw = archive.read(f"{prefix}data/{key}")
      storage.array = _from_bytes(raw, storage.dtype, byteorder == "little")
  return obj


class _PlainUnpickler(pickle.Unpickler):
  """Plain values only (the legacy stream's framing: its magic number,
  protocol, sys info and storage keys): any global is refused, so a file
  that names a callable there cannot run it."""

  def find_class(self, module, name):
    raise _Refused(f"refusing to unpickle {module}.{name}")


def _plain_load(f) -> Any:
  return _PlainUnpickler(f).load()


def _load_legacy(path: str) -> Any:
  with open(path, "rb") as f:
    if _plain_load(f) != _LEGACY_MAGIC:
      raise ValueError(f"{path}: not a torch file (bad magic number)")
    if _plain_load(f) != _LEGACY_PROTOCOL:
      raise ValueError(f"{path}: unsupported legacy torch protocol")
    sys_info = _plain_load(f)
    little = sys_info.get("little_endian", True)
    storages: Dict[str, _Storage] = {}
    obj = _Unpickler(f, storages).load()
    keys = _plain_load(f)
    order = "<" if little else ">"
    for key in keys:
      storage = storages[str(key)]
      (numel,) = struct.unpack(order + "q", f.read(8))
      raw = f.read(numel * storage.dtype.itemsize)
      if len(raw) != numel * storage.dtype.itemsize:
        raise ValueError(f"{path}: truncated storage {key}")
      storage.array = _from_bytes(raw, storage.dtype, little)
  return obj


class RefusedPickleError(errors.JaxsdError, pickle.UnpicklingError):
  """A torch file whose pickle names something other than tensors and plain
  values (code it would run when loaded): refused, nothing of it run."""


def load_torch_file(path: str) -> Any:
  """Unpickles a torch.save file with every tensor as a numpy array.

  Raises:
    RefusedPickleError: the file's pickle names any other global.
  """
  try:
    obj = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
  except _Refused as e:
    raise RefusedPickleError(
        f"{path}: {e}; torch weights hold only tensors and plain values, so "
        "this file is not plain weights (loading it with torch would run "
        "that code). Nothing of it was run: use weights from a source you "
        "trust, preferably as .safetensors.") from None
  return _materialise(obj)


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """A `.pth` state dict as {name: np.ndarray}; unwraps {"state_dict": ...}."""
  obj = load_torch_file(path)
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(
      obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
  return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
