"""LoRA (low-rank adapters) for Flax param trees.

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

diffusers' LoRA file format (peft key names, safetensors read and write) is
in jaxsd/interop/lora_format.py.
"""
import contextlib
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsd.models import remat

Path = Tuple[str, ...]

# diffusers' attention projections in the UNet (jaxsd and diffusers' Flax
# UNet name them as the PyTorch modules), and CLIP's in the text encoder.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out_0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

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


def adapter_modules(adapters) -> Dict[Path, Dict[str, Any]]:
  """{module path: {"down": [in, r], "up": [r, out]}} of the adapters,
  checked (both leaves, one rank per module)."""
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
           for pair in adapter_modules(adapters).values()}
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
  for path, pair in adapter_modules(adapters).items():
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
  modules = adapter_modules(adapters)
  if dropout > 0 and rng is None:
    raise ValueError("LoRA dropout > 0 needs an rng.")
  index = {path: i for i, path in enumerate(sorted(modules))}
  calls: Dict[Path, int] = {}

  def interceptor(next_fun, call_args, call_kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, nn.Dense):
      return next_fun(*call_args, **call_kwargs)
    path = tuple(module.path)
    pair = current["modules"].get(path)
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

  # What the interceptor reads, swappable: remat's CPU recomputation passes
  # the adapters through its custom VJP as inputs (remat.closure_inputs).
  # With dropout the mask's rng is closed over too: not declared, so remat
  # falls back to plain checkpointing there.
  current = {"modules": modules}

  def put(value):
    current["modules"] = value
  declared = (remat.closure_inputs(lambda: current["modules"], put)
              if dropout == 0 else contextlib.nullcontext())
  with nn.intercept_methods(interceptor), declared:
    out = apply_fn(params, *args, **kwargs)
  unused = sorted(set(modules) - set(calls))
  if unused:
    raise ValueError(
        f"{len(unused)} LoRA adapters were never called, e.g. "
        f"{'/'.join(unused[0])}: apply_fn ran no nn.Dense at that module "
        "path (adapters for another model or param nesting, or an apply_fn "
        "jitted and traced before).")
  return out
