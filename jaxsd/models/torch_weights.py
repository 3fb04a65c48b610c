"""PyTorch weight files as numpy state dicts, and their layout in Flax.

- `read_safetensors(path)`: a `.safetensors` file, read with the format's
  own rules (an 8-byte header length, a JSON header, raw little-endian
  bytes), so bf16/f16 tensors load too (ml_dtypes) and no code runs.
- `read_weights(folder, stem)`: `stem.safetensors` if present, else
  `stem.bin` through torch_checkpoint's restricted unpickler (tensors,
  containers and plain values only: a pickle naming any other callable is
  refused, never run).
- `to_flax_tree(state_dict)`: diffusers' PyTorch names and layouts ->
  a nested Flax param dict: "a.b.0.c.weight" -> {"a": {"b_0": {"c":
  {"kernel" | "scale": ...}}}}; conv weights [O, I, kh, kw] -> [kh, kw, I,
  O], linear [O, I] -> [I, O], norm weights -> "scale".
"""
import json
import os
import struct
from typing import Callable, Dict, Optional, Tuple

import ml_dtypes
import numpy as np

from jaxsd.models import torch_checkpoint

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """name -> array of a .safetensors file (arrays own their memory)."""
  with open(path, "rb") as f:
    data = f.read()
  if len(data) < 8:
    raise ValueError(f"{path} is not a safetensors file (too short).")
  (n,) = struct.unpack("<Q", data[:8])
  try:
    header = json.loads(data[8:8 + n])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} is not a safetensors file: its header does "
                     f"not parse ({e}).") from None
  out = {}
  base = 8 + n
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
      raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, "
                       "which jaxsd does not read.")
    start, end = info["data_offsets"]
    array = np.frombuffer(data[base + start:base + end], dtype=dtype)
    out[name] = array.reshape(info["shape"]).copy()
  return out


def weight_file(folder: str, stem: str = "diffusion_pytorch_model"
                ) -> Optional[str]:
  """The folder's `stem.safetensors`, else `stem.bin`, else None."""
  for suffix in (".safetensors", ".bin"):
    path = os.path.join(folder, stem + suffix)
    if os.path.exists(path):
      return path
  return None


def read_weights(folder: str, stem: str = "diffusion_pytorch_model"
                 ) -> Dict[str, np.ndarray]:
  """The folder's PyTorch state dict: `.safetensors` first, else `.bin`
  read weights-only."""
  path = weight_file(folder, stem)
  if path is None:
    raise FileNotFoundError(
        f"No {stem}.safetensors or {stem}.bin in {folder}: a diffusers model "
        "folder holds its config.json and one of these weight files.")
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  return torch_checkpoint.load_state_dict(path)


def _flax_name(parts):
  """["down_blocks", "0", "resnets", "1", "conv1"] -> down_blocks_0/..."""
  out = []
  for part in parts:
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return out


def to_flax_tree(state_dict: Dict[str, np.ndarray],
                 rename: Optional[Callable[[str], str]] = None,
                 norm_modules: Callable[[str], bool] = lambda path: "norm" in path
                 ) -> dict:
  """A PyTorch state dict as a nested Flax param dict (see module doc).

  rename: maps each PyTorch key before conversion (legacy names).
  norm_modules: whether the module at a path is a norm (its "weight" is a
    "scale"); by default any path with "norm" in its last module name.
  """
  tree: dict = {}
  for key, value in state_dict.items():
    key = rename(key) if rename else key
    *module, leaf = key.split(".")
    path = _flax_name(module)
    value = np.asarray(value)
    if leaf == "weight":
      if value.ndim == 4:
        leaf, value = "kernel", np.transpose(value, (2, 3, 1, 0))
      elif value.ndim == 2:
        leaf, value = "kernel", value.T
      elif norm_modules(path[-1] if path else ""):
        leaf = "scale"
      else:
        leaf = "embedding" if value.ndim == 2 else "scale"
    node = tree
    for name in path:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def torch_shape(path: Tuple[str, ...], shape) -> Tuple[int, ...]:
  """A Flax param's shape in PyTorch's layout (conv [O, I, kh, kw], linear
  [O, I]); the inverse of `to_flax_tree`'s transposes."""
  shape = tuple(shape)
  if path[-1] != "kernel":
    return shape
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return shape[::-1]


def to_torch_layout(path: Tuple[str, ...], value) -> np.ndarray:
  """A Flax param as its PyTorch tensor (a float32 copy: np.asarray of a jax
  array is a read-only view, which torch.from_numpy must not write to)."""
  value = np.array(value, np.float32)
  if path[-1] == "kernel":
    value = np.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else value.T
  return np.ascontiguousarray(value)
