"""diffusers' LoRA file format: `pytorch_lora_weights.safetensors`.

jaxsd's adapters (jaxsd/models/lora.py: {"down": [in, r], "up": [r, out]}
per Dense module) as the tensors diffusers' `pipeline.load_lora_weights`
reads, and back:

- peft key names: "{unet|text_encoder}.{PyTorch module}.lora_A.weight"
  [r, in] (down^T) and ".lora_B.weight" [out, r] (up^T), float32;
- alpha, which is no tensor, in the file's safetensors metadata
  (`lora_adapter_metadata`: peft LoraConfig kwargs per component).

- `save_diffusers_lora(folder, unet_adapters, text_adapters, alpha=...)`
- `load_diffusers_lora(path, unet_params, text_params)`
"""
import json
import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import flax
import jax.numpy as jnp
import numpy as np

from jaxsd.models import lora

Path = lora.Path

# What diffusers' loaders read: the file name in a LoRA folder, the
# safetensors metadata key holding peft LoraConfig kwargs per component, and
# the components' key prefixes.
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
UNET_PREFIX = "unet"
TEXT_PREFIX = "text_encoder"


def _flat(tree) -> Dict[Path, Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


# jaxsd/Flax module names that are diffusers' ModuleList entries:
# "down_blocks_0" -> "down_blocks.0" (others, e.g. "linear_1", keep theirs).
_INDEXED = ("down_blocks", "up_blocks", "attentions", "resnets",
            "transformer_blocks", "to_out", "downsamplers", "upsamplers",
            "net", "layers")
_INDEXED_RE = re.compile(rf"^({'|'.join(_INDEXED)})_(\d+)$")


def diffusers_module_name(path: Path) -> str:
  """A Flax module path as the PyTorch module's name:
  ("down_blocks_0", "attentions_0", ..., "to_out_0") ->
  "down_blocks.0.attentions.0....to_out.0"; CLIP's ("text_model", "encoder",
  "layers", "0", ...) -> "text_model.encoder.layers.0....". """
  return ".".join(_INDEXED_RE.sub(r"\1.\2", part) for part in path)


def to_diffusers_state_dict(adapters, prefix: str = UNET_PREFIX
                            ) -> Dict[str, np.ndarray]:
  """Adapters as diffusers/peft tensors, float32 in PyTorch's layout:
  "{prefix}.{module}.lora_A.weight" [r, in] (down^T) and ".lora_B.weight"
  [out, r] (up^T). alpha is not a tensor: see `lora_metadata`."""
  out = {}
  lead = f"{prefix}." if prefix else ""
  for path, pair in sorted(lora.adapter_modules(adapters).items()):
    name = lead + diffusers_module_name(path)
    out[f"{name}.lora_A.weight"] = np.ascontiguousarray(
        np.asarray(pair["down"], np.float32).T)
    out[f"{name}.lora_B.weight"] = np.ascontiguousarray(
        np.asarray(pair["up"], np.float32).T)
  return out


def lora_metadata(adapters, alpha: float, prefix: str = UNET_PREFIX
                  ) -> Dict[str, Any]:
  """peft LoraConfig kwargs for one component, keyed "{prefix}.{field}", as
  diffusers 0.39 stores them in the file's `lora_adapter_metadata`. Without
  them diffusers takes lora_alpha = r (scaling 1)."""
  names = sorted(diffusers_module_name(p)
                 for p in lora.adapter_modules(adapters))
  config = {"r": lora.rank_of(adapters), "lora_alpha": float(alpha),
            "target_modules": names, "rank_pattern": {},
            "alpha_pattern": {}}
  return {f"{prefix}.{k}": v for k, v in config.items()}


def save_diffusers_lora(folder: str, unet_adapters=None, text_adapters=None,
                        *, alpha: float) -> str:
  """Writes `folder/pytorch_lora_weights.safetensors` for diffusers'
  `pipeline.load_lora_weights(folder)`: UNet adapters under "unet.", text
  encoder ones under "text_encoder.", alpha in the metadata. Returns the
  file's path."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  tensors, metadata = {}, {}
  for adapters, prefix in ((unet_adapters, UNET_PREFIX),
                           (text_adapters, TEXT_PREFIX)):
    if adapters:
      tensors.update(to_diffusers_state_dict(adapters, prefix))
      metadata.update(lora_metadata(adapters, alpha, prefix))
  if not tensors:
    raise ValueError("save_diffusers_lora: no adapters to save.")
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, WEIGHT_NAME)
  tmp = path + ".tmp"
  safetensors.numpy.save_file(
      tensors, tmp, metadata={"format": "pt", METADATA_KEY: json.dumps(
          metadata, indent=2, sort_keys=True)})
  os.replace(tmp, path)
  return path


def from_diffusers_state_dict(state_dict: Mapping[str, Any], params,
                              prefix: str = UNET_PREFIX) -> dict:
  """The adapters in a diffusers/peft LoRA state dict for one component.

  state_dict: "{prefix}.{module}.lora_A.weight" [r, in] / ".lora_B.weight"
    [out, r]; keys under other prefixes are ignored.
  params: the component's param tree (or its shapes): module names are
    resolved against its Dense layers, shapes checked against its kernels.
  """
  lead = f"{prefix}." if prefix else ""
  dense = {diffusers_module_name(k[:-1]): (k[:-1], v.shape)
           for k, v in _flat(params).items()
           if k[-1] == "kernel" and len(v.shape) == 2}
  tensors: Dict[str, Dict[str, np.ndarray]] = {}
  for key, value in state_dict.items():
    if not key.startswith(lead):
      continue
    m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", key[len(lead):])
    if m is None:
      raise ValueError(
          f"LoRA key {key!r} is not a peft lora_A/lora_B weight; jaxsd reads "
          "diffusers' peft-format files only (no kohya 'lora_unet_' keys, "
          "DoRA or LoRA biases).")
    tensors.setdefault(m.group(1), {})[m.group(2)] = np.asarray(value)
  out = {}
  for name, pair in tensors.items():
    if name not in dense:
      raise ValueError(f"LoRA module {lead}{name} is not a Dense layer of "
                       "these params.")
    if set(pair) != {"lora_A", "lora_B"}:
      raise ValueError(f"LoRA module {lead}{name} has only {sorted(pair)}.")
    path, (fan_in, fan_out) = dense[name]
    a, b = pair["lora_A"], pair["lora_B"]
    if (a.shape[1], b.shape[0], a.shape[0]) != (fan_in, fan_out, b.shape[1]):
      raise ValueError(f"LoRA module {lead}{name}: lora_A {a.shape} and "
                       f"lora_B {b.shape} do not fit a [{fan_in}, {fan_out}] "
                       "kernel.")
    out[path + ("down",)] = jnp.asarray(a.T, jnp.float32)
    out[path + ("up",)] = jnp.asarray(b.T, jnp.float32)
  return flax.traverse_util.unflatten_dict(out)


def _read_metadata(path: str) -> Dict[str, Any]:
  """The file's lora_adapter_metadata ({} if none)."""
  import safetensors  # pylint: disable=g-import-not-at-top
  with safetensors.safe_open(path, framework="np") as f:
    raw = (f.metadata() or {}).get(METADATA_KEY)
  return json.loads(raw) if raw else {}


def _alpha(metadata: Dict[str, Any], adapters, prefix: str) -> float:
  """lora_alpha from the metadata; r when absent (diffusers' default)."""
  config = {k[len(prefix) + 1:]: v for k, v in metadata.items()
            if k.startswith(prefix + ".")}
  for field in ("rank_pattern", "alpha_pattern"):
    if config.get(field):
      raise ValueError(f"{prefix} LoRA has a {field}; jaxsd supports one "
                       "rank and alpha per component.")
  rank = lora.rank_of(adapters)
  if "r" in config and config["r"] != rank:
    raise ValueError(f"{prefix} LoRA metadata says r={config['r']}, its "
                     f"tensors have rank {rank}.")
  return float(config.get("lora_alpha", rank))


def load_diffusers_lora(path: str, unet_params=None, text_params=None
                        ) -> Tuple[Optional[dict], Optional[dict], float]:
  """(unet adapters, text adapters, alpha) of a diffusers LoRA file or of
  the folder holding `pytorch_lora_weights.safetensors`. A component is
  None when its params are not given or the file has none of it; raises
  if the two components' alphas differ (jaxsd uses one)."""
  from jaxsd.models import torch_weights  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path):
    path = os.path.join(path, WEIGHT_NAME)
  state_dict = torch_weights.read_safetensors(path)
  metadata = _read_metadata(path)
  results, alphas = [], set()
  for params, prefix in ((unet_params, UNET_PREFIX),
                         (text_params, TEXT_PREFIX)):
    adapters = (None if params is None else
                from_diffusers_state_dict(state_dict, params, prefix))
    if adapters:
      alphas.add(_alpha(metadata, adapters, prefix))
    results.append(adapters or None)
  if not alphas:
    raise ValueError(f"{path} has no LoRA for the components given.")
  if len(alphas) > 1:
    raise ValueError(f"{path}: the UNet and text encoder LoRAs have alphas "
                     f"{sorted(alphas)}; jaxsd uses one.")
  return results[0], results[1], alphas.pop()
