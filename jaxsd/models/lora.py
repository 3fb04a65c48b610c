"""LoRA (low-rank adapters) for Flax param trees, in diffusers' file format.

A LoRA adapter on a Dense layer y = x W + b adds a rank-r update:

    y = x W + b + scale * (alpha / r) * dropout(x) @ down @ up

with down [in, r] (peft's lora_A, transposed) and up [r, out] (lora_B,
transposed; zeros at the start, so a fresh adapter changes nothing).
`scale` is the caller's multiplier (diffusers' `lora_scale`, 1 in
training); alpha / r is the adapter's own scaling, as in peft.

Adapters are a nested dict that mirrors the params down to each adapted
Dense module, with {"down", "up"} (float32) where the module's {"kernel",
"bias"} are: {"down_blocks_0": {"attentions_0": {..., "to_q": {"down": [in,
r], "up": [r, out]}}}}. They are an ordinary pytree: the thing to
differentiate, optimise, average and checkpoint; the base params stay
frozen and are never differentiated.

- `target_paths(params, targets)`: the Dense modules the targets name.
- `init_adapters(rng, params, targets, rank)`: fresh adapters.
- `merge(params, adapters, alpha, scale)`: W + scale * alpha / r * down @ up
  folded into the kernels (what sampling, evaluation and export use).
- `apply_with_adapters(apply_fn, params, adapters, *args, alpha=...)`: runs
  `apply_fn(params, *args)` with the adapters added to the matching Dense
  calls, with dropout on their input (peft's train-time forward, which
  merging cannot express).
- `save_diffusers_lora` / `load_diffusers_lora`: `pytorch_lora_weights.
  safetensors` as diffusers' `load_lora_weights` reads it (peft keys, alpha
  in the file's `lora_adapter_metadata`).
"""
import dataclasses
import json
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Path = Tuple[str, ...]

# diffusers' attention projections in the UNet (jaxsd and diffusers' Flax
# UNet name them as the PyTorch modules), and CLIP's in the text encoder.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out_0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

# What diffusers' loaders read: the file name in a LoRA folder, the
# safetensors metadata key holding peft LoraConfig kwargs per component, and
# the components' key prefixes.
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
UNET_PREFIX = "unet"
TEXT_PREFIX = "text_encoder"

_ADAPTER_LEAVES = ("down", "up")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA settings: rank r, alpha (the update is scaled by alpha / r),
  dropout on the adapter's input (training only), and the targeted module
  names (see `target_paths`)."""
  rank: int = 4
  alpha: float = 4.0
  dropout: float = 0.0
  targets: Tuple[str, ...] = UNET_TARGETS
  # A run's text encoder adapters (() = the text encoder is not adapted)
  # and the dtype its frozen base weights are kept in.
  text_targets: Tuple[str, ...] = ()
  base_dtype: str = "float32"

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"LoRA rank={self.rank}; it must be >= 1.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout={self.dropout}; it must be in [0, 1).")
    if self.alpha <= 0:
      raise ValueError(f"LoRA alpha={self.alpha}; it must be > 0.")
    if self.base_dtype not in BASE_DTYPES:
      raise ValueError(f"model.lora.base_dtype={self.base_dtype!r}; choose "
                       f"one of {sorted(BASE_DTYPES)}.")


BASE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def from_config(lora_config) -> Optional[LoraConfig]:
  """A run's LoRA settings (config model.lora), or None when rank is 0."""
  if lora_config is None or lora_config.rank == 0:
    return None
  if lora_config.rank < 0:
    raise ValueError(f"model.lora.rank={lora_config.rank}; it must be >= 0 "
                     "(0 = no LoRA, full training).")
  return LoraConfig(rank=lora_config.rank,
                    alpha=float(lora_config.alpha or lora_config.rank),
                    dropout=lora_config.dropout,
                    targets=tuple(lora_config.unet_targets),
                    text_targets=tuple(lora_config.text_targets),
                    base_dtype=lora_config.base_dtype)


def cast_base(params, base_dtype: str):
  """The frozen base in base_dtype (floating leaves only)."""
  dtype = BASE_DTYPES[base_dtype]
  return jax.tree_util.tree_map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
      else x, params)


# ------------------------------------------------------------------------
# Targets, initialisation, merging
# ------------------------------------------------------------------------


def _flat(tree) -> Dict[Path, Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def _matches(path: Path, target: str) -> bool:
  """A target is a module name ("to_q") or a path suffix ("attn2/to_k")."""
  parts = tuple(target.split("/"))
  return path[-len(parts):] == parts


def target_paths(params, targets: Sequence[str]) -> List[Path]:
  """Module paths (without "kernel") of the Dense layers `targets` name, in
  the params' flattened order.

  params: a param tree (arrays or ShapeDtypeStructs: only shapes are read).
  targets: module names ("to_q") or path suffixes ("attn2/to_k").
  Raises if none match, or if a match is not a Dense ([in, out] kernel).
  """
  if isinstance(targets, str):
    targets = (targets,)
  paths = []
  for key, leaf in _flat(params).items():
    if key[-1] != "kernel":
      continue
    module = key[:-1]
    if not any(_matches(module, t) for t in targets):
      continue
    if len(leaf.shape) != 2:
      raise ValueError(
          f"LoRA target {'/'.join(module)} has a {list(leaf.shape)} kernel; "
          "LoRA here adapts Dense layers ([in, out] kernels) only.")
    paths.append(module)
  if not paths:
    dense = sorted({k[-2] for k, v in _flat(params).items()
                    if k[-1] == "kernel" and len(v.shape) == 2})
    raise ValueError(f"No Dense layer matches the LoRA targets "
                     f"{list(targets)}; the Dense module names are {dense}.")
  return paths


def init_adapters(rng, params, targets: Sequence[str], rank: int) -> dict:
  """Fresh float32 adapters for the targets: down [in, r] ~ U(-1/sqrt(in),
  1/sqrt(in)) (peft's default, kaiming-uniform with a = sqrt(5)), up [r, out]
  zeros, so the adapted model starts equal to the base."""
  flat = _flat(params)
  out = {}
  for i, path in enumerate(target_paths(params, targets)):
    fan_in, fan_out = flat[path + ("kernel",)].shape
    bound = 1.0 / np.sqrt(fan_in)
    out[path + ("down",)] = jax.random.uniform(
        jax.random.fold_in(rng, i), (fan_in, rank), jnp.float32, -bound,
        bound)
    out[path + ("up",)] = jnp.zeros((rank, fan_out), jnp.float32)
  return flax.traverse_util.unflatten_dict(out)


def _adapter_modules(adapters) -> Dict[Path, Dict[str, Any]]:
  """{module path: {"down": ..., "up": ...}}, checked."""
  modules: Dict[Path, Dict[str, Any]] = {}
  for key, leaf in _flat(adapters).items():
    if key[-1] not in _ADAPTER_LEAVES:
      raise ValueError(f"adapter leaf {'/'.join(key)}: expected 'down' or "
                       "'up' under each adapted module.")
    modules.setdefault(key[:-1], {})[key[-1]] = leaf
  for path, pair in modules.items():
    if set(pair) != set(_ADAPTER_LEAVES):
      raise ValueError(f"adapter {'/'.join(path)} has {sorted(pair)}; it "
                       "needs both 'down' and 'up'.")
    if pair["down"].shape[-1] != pair["up"].shape[0]:
      raise ValueError(f"adapter {'/'.join(path)}: down "
                       f"{pair['down'].shape} and up {pair['up'].shape} "
                       "disagree on the rank.")
  return modules


def rank_of(adapters) -> int:
  """The adapters' rank (one for all; raises if they mix ranks)."""
  ranks = {pair["down"].shape[-1]
           for pair in _adapter_modules(adapters).values()}
  if len(ranks) != 1:
    raise ValueError(f"the adapters have ranks {sorted(ranks)}; one rank "
                     "for all is expected.")
  return ranks.pop()


def delta(down, up, alpha: float, scale: float = 1.0):
  """The kernel update scale * alpha / r * down @ up, [in, out] float32."""
  rank = down.shape[-1]
  return (scale * alpha / rank) * (down.astype(jnp.float32)
                                   @ up.astype(jnp.float32))


def merge(params, adapters, alpha: float, scale: float = 1.0):
  """The params with the adapters folded in: kernel W -> W + scale * alpha
  / r * down @ up, computed in float32 and cast back to W's dtype (bf16
  bases stay bf16). Untargeted leaves are passed through unchanged. Works
  under jit."""
  flat = _flat(params)
  for path, pair in _adapter_modules(adapters).items():
    key = path + ("kernel",)
    if key not in flat:
      raise ValueError(f"adapter {'/'.join(path)} has no kernel in the "
                       "params.")
    w = flat[key]
    d = delta(pair["down"], pair["up"], alpha, scale)
    if d.shape != w.shape:
      raise ValueError(f"adapter {'/'.join(path)} makes a {d.shape} update "
                       f"for a {w.shape} kernel.")
    flat[key] = (w.astype(jnp.float32) + d).astype(w.dtype)
  return flax.traverse_util.unflatten_dict(flat)


# ------------------------------------------------------------------------
# Train-time forward: adapters (with dropout) added to the Dense calls
# ------------------------------------------------------------------------


def apply_with_adapters(apply_fn: Callable, params, adapters, *args,
                        alpha: float, scale: float = 1.0,
                        dropout: float = 0.0, rng=None, **kwargs):
  """`apply_fn(params, *args, **kwargs)` with LoRA on the adapted Dense
  layers: each `nn.Dense` whose module path has an adapter returns

      base(x) + scale * alpha / r * dropout(x) @ down @ up

  (peft's LoRA forward). With dropout 0 this equals apply_fn on
  `merge(params, adapters, alpha, scale)`, up to float rounding.

  apply_fn: runs one Flax linen module on `params` as its root "params"
    collection, e.g. `JaxsdUNet.apply(params, x, t, context)`, `TextEncoder.
    __call__(params, ids)`, or `lambda p, *a: module.apply({"params": p},
    *a)`; the module paths must equal the adapters' paths.
  params: the frozen base params. Take gradients w.r.t. `adapters` only
    (jax.grad's argnums, or stop_gradient on params): nothing of the base is
    differentiated.
  dropout: the rate on the adapters' input; > 0 needs `rng`. Each adapted
    call gets its own mask, from fold_in(rng, module index, call index).

  Runs the adapted layers through `flax.linen.intercept_methods` around
  `nn.Dense.__call__`, so it must be called where apply_fn is traced (inside
  the jitted step, not around a jitted apply_fn that was already traced).
  Raises if an adapter was never called: a path mismatch would otherwise
  train nothing.
  """
  modules = _adapter_modules(adapters)
  if dropout > 0 and rng is None:
    raise ValueError("LoRA dropout > 0 needs an rng.")
  index = {path: i for i, path in enumerate(sorted(modules))}
  calls: Dict[Path, int] = {}

  def interceptor(next_fun, call_args, call_kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, nn.Dense):
      return next_fun(*call_args, **call_kwargs)
    path = tuple(module.path)
    pair = modules.get(path)
    if pair is None:
      return next_fun(*call_args, **call_kwargs)
    y = next_fun(*call_args, **call_kwargs)
    x = call_args[0] if call_args else call_kwargs["inputs"]
    n = calls[path] = calls.get(path, 0) + 1
    if dropout > 0:
      key = jax.random.fold_in(jax.random.fold_in(rng, index[path]), n)
      keep = jax.random.bernoulli(key, 1.0 - dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - dropout), jnp.zeros_like(x))
    down, up = pair["down"], pair["up"]
    # In the layer's compute dtype, as the layer computes its own matmul.
    h = x.astype(y.dtype) @ down.astype(y.dtype)
    update = (h @ up.astype(y.dtype)) * (scale * alpha / down.shape[-1])
    return y + update.astype(y.dtype)

  with nn.intercept_methods(interceptor):
    out = apply_fn(params, *args, **kwargs)
  unused = sorted(set(modules) - set(calls))
  if unused:
    raise ValueError(
        f"{len(unused)} LoRA adapters were never called, e.g. "
        f"{'/'.join(unused[0])}: apply_fn ran no nn.Dense at that module "
        "path (adapters for another model or param nesting, or an apply_fn "
        "jitted and traced before).")
  return out


# ------------------------------------------------------------------------
# diffusers' LoRA format (peft keys)
# ------------------------------------------------------------------------

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
  for path, pair in sorted(_adapter_modules(adapters).items()):
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
  names = sorted(diffusers_module_name(p) for p in _adapter_modules(adapters))
  config = {"r": rank_of(adapters), "lora_alpha": float(alpha),
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
  rank = rank_of(adapters)
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
