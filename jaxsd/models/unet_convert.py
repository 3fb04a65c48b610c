"""diffusers' PyTorch UNet2DConditionModel <-> jaxsd's UNet (models/unet.py).

jaxsd's UNet keeps diffusers' module names, so its PyTorch weights convert
by name (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight`
is `down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel`),
with conv kernels [O, I, kh, kw] -> [kh, kw, I, O] and linears [O, I] ->
[I, O]. No Flax class of diffusers is in the path.

- `unet_from_config(cfg)`: the UNet a diffusers config.json describes; a
  field that would need an architecture jaxsd does not implement is refused,
  naming it.
- `convert_diffusers_weights(state_dict, module_or_cfg)` and its inverse
  `to_diffusers_weights(params)`; `config_to_diffusers(module)`.
- `load_diffusers(path)` reads a `unet/` folder, or a pipeline folder
  holding one; `save_diffusers(module, params, folder)` writes one that
  `UNet2DConditionModel.from_pretrained` loads.

The PyTorch UNet differs from jaxsd's (which follows diffusers' Flax UNet)
in two small numerical details; see `NUMERICS`.
"""
import json
import os
from typing import Any, Dict, Iterable, Tuple, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxsd.models import torch_checkpoint
from jaxsd.models import torch_weights
from jaxsd.models import unet as unet_lib

Dtype = Any
WEIGHTS = "diffusion_pytorch_model"  # diffusers' weight file stem
FLAX_WEIGHTS = "diffusion_flax_model.msgpack"

NUMERICS = """\
Where PyTorch's UNet2DConditionModel computes differently from jaxsd's
default UNet (which follows diffusers' Flax UNet): GEGLU's GELU is exact
there, tanh-approximate here; the transformers' GroupNorm has eps 1e-6
there, 1e-5 here. Modules built for PyTorch weights (`unet_from_config`)
set UNet.torch_numerics and compute as PyTorch does."""

# --- Config ------------------------------------------------------------------

# diffusers fields whose every value but one changes the architecture into
# something jaxsd's UNet does not implement: field -> the value it needs.
_REQUIRED = {
    "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
    "norm_eps": 1e-5, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "dual_cross_attention": False, "class_embed_type": None,
    "addition_embed_type": None, "addition_time_embed_dim": None,
    "num_class_embeds": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default",
    "class_embeddings_concat": False, "cross_attention_norm": None,
}
# Fields with no effect on jaxsd's parameters or outputs here: the default
# image size, attention computed in float32 anyway (jaxsd's scores are
# float32), the mid block's cross-only switch (UNetMidBlock2DCrossAttn has
# none), the head count of an addition embedding that must be absent, and
# FlaxUNet2DConditionModel's compute settings.
_IGNORED = ("sample_size", "upcast_attention", "mid_block_only_cross_attention",
            "addition_embed_type_num_heads", "dtype",
            "use_memory_efficient_attention", "split_head_dim")
# Fields checked one by one below, then handed to unet_from_diffusers_config.
_MAPPED = ("in_channels", "out_channels", "down_block_types", "up_block_types",
           "only_cross_attention", "block_out_channels", "layers_per_block",
           "attention_head_dim", "num_attention_heads", "cross_attention_dim",
           "norm_num_groups", "flip_sin_to_cos", "freq_shift",
           "use_linear_projection", "transformer_layers_per_block",
           "reverse_transformer_layers_per_block", "time_embedding_dim",
           "dropout")
_DEFAULTS = {  # UNet2DConditionModel's, where the checks need them
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "attention_head_dim": 8, "cross_attention_dim": 1280,
    "norm_num_groups": 32, "transformer_layers_per_block": 1,
    "num_attention_heads": None,
}


def _unsupported(source: str, key: str, value, why: str) -> ValueError:
  return ValueError(f"{source}: {key}={value!r} is not supported by jaxsd's "
                    f"UNet ({why}).")


def _one_value(cfg, key: str, source: str):
  """A per-block list whose entries all agree, as that one value."""
  value = cfg.get(key, _DEFAULTS[key])
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise _unsupported(source, key, value,
                         "it needs the same value for every block")
    value = value[0]
  return value


def _per_block_ints(cfg, key: str, n: int, source: str):
  value = cfg.get(key, _DEFAULTS[key])
  values = list(value) if isinstance(value, (list, tuple)) else [value] * n
  if len(values) != n or not all(isinstance(v, int) and not isinstance(v, bool)
                                 for v in values):
    raise _unsupported(source, key, value,
                       f"it needs an int or {n} ints, one per block")
  return values


def _check(cfg: Dict[str, Any], source: str) -> Dict[str, Any]:
  """Refuses what jaxsd cannot build; returns unet_from_diffusers_config's
  fields (per-block lists as tuples, lists that must agree collapsed)."""
  name = cfg.get("_class_name", "UNet2DConditionModel")
  if name not in ("UNet2DConditionModel", "FlaxUNet2DConditionModel"):
    raise ValueError(f"{source} describes a {name!r}; jaxsd's UNet reads "
                     "UNet2DConditionModel configs only.")
  for key, want in _REQUIRED.items():
    if key in cfg and cfg[key] != want:
      raise _unsupported(source, key, cfg[key], f"it implements {want!r} only")
  unknown = sorted(k for k in cfg if not k.startswith("_") and k not in
                   set(_REQUIRED) | set(_IGNORED) | set(_MAPPED))
  if unknown:
    fields = ", ".join(f"{k}={cfg[k]!r}" for k in unknown)
    raise ValueError(f"{source}: {fields}: not UNet2DConditionModel fields "
                     "jaxsd's UNet knows; it does not support them.")

  channels = tuple(cfg.get("block_out_channels",
                           _DEFAULTS["block_out_channels"]))
  n = len(channels)
  for key in ("down_block_types", "up_block_types"):
    direction = "Down" if key.startswith("down") else "Up"
    types = tuple(cfg.get(key, _DEFAULTS[key]))
    for t in types:
      if t not in (f"CrossAttn{direction}Block2D", f"{direction}Block2D"):
        raise _unsupported(source, key, list(types),
                           f"it implements CrossAttn{direction}Block2D and "
                           f"{direction}Block2D only; {t!r} is neither")
    if len(types) != n:
      raise ValueError(f"{source}: {len(types)} {key} for {n} "
                       "block_out_channels.")
  if cfg.get("norm_num_groups", 32) is None:
    raise _unsupported(source, "norm_num_groups", None,
                       "it always has GroupNorms")
  heads = _per_block_ints(cfg, "attention_head_dim", n, source)
  # diffusers' naming quirk (issue #2011): attention_head_dim is the number
  # of heads unless num_attention_heads is given, which UNet2DConditionModel
  # itself refuses; accept it only where it means the same.
  if cfg.get("num_attention_heads") is not None:
    if _per_block_ints(cfg, "num_attention_heads", n, source) != heads:
      raise _unsupported(
          source, "num_attention_heads", cfg["num_attention_heads"],
          "it takes the head count from attention_head_dim, which is "
          f"{cfg.get('attention_head_dim', 8)!r} here")
  for c, h in zip(channels, heads):
    if c % h:
      raise _unsupported(source, "attention_head_dim",
                         cfg.get("attention_head_dim", 8),
                         f"{h} heads do not split {c} channels")
  depths = _per_block_ints(cfg, "transformer_layers_per_block", n, source)
  reverse = cfg.get("reverse_transformer_layers_per_block")
  if reverse is not None and list(reverse) != depths[::-1]:
    raise _unsupported(source, "reverse_transformer_layers_per_block", reverse,
                       "its up blocks mirror the down blocks' "
                       f"transformer_layers_per_block, {depths[::-1]} here")
  time_dim = cfg.get("time_embedding_dim")
  if time_dim is not None and time_dim != 4 * channels[0]:
    raise _unsupported(source, "time_embedding_dim", time_dim,
                       f"it is 4 * block_out_channels[0] = {4 * channels[0]}")

  out = {k: cfg[k] for k in ("in_channels", "out_channels", "flip_sin_to_cos",
                             "freq_shift", "use_linear_projection",
                             "norm_num_groups", "dropout") if k in cfg}
  for key in ("down_block_types", "up_block_types"):
    out[key] = tuple(cfg.get(key, _DEFAULTS[key]))
  out["block_out_channels"] = channels
  out["layers_per_block"] = _one_value(cfg, "layers_per_block", source)
  out["cross_attention_dim"] = _one_value(cfg, "cross_attention_dim", source)
  out["attention_head_dim"] = (heads[0] if len(set(heads)) == 1
                               else tuple(heads))
  out["transformer_layers_per_block"] = (depths[0] if len(set(depths)) == 1
                                         else tuple(depths))
  cross_only = cfg.get("only_cross_attention", False)
  out["only_cross_attention"] = (tuple(cross_only) if isinstance(
      cross_only, (list, tuple)) else cross_only)
  return out


def unet_from_config(cfg: Dict[str, Any], dtype: Dtype = jnp.float32,
                     source: str = "config.json",
                     torch_numerics: bool = True) -> unet_lib.UNet:
  """The jaxsd UNet a diffusers UNet2DConditionModel config describes (SD
  1.x and 2.x: per-block head counts, linear projections, any cross
  dimension, several transformer layers per block), computing as PyTorch's
  does (torch_numerics; False: as diffusers' Flax UNet, for Flax weights).

  Raises ValueError naming any field whose value jaxsd does not implement.
  """
  module = unet_lib.unet_from_diffusers_config(_check(dict(cfg), source),
                                               dtype)
  return module.clone(torch_numerics=torch_numerics)


def config_to_diffusers(module: unet_lib.UNet, sample_size=None
                        ) -> Dict[str, Any]:
  """The config.json of `module` for diffusers' UNet2DConditionModel.

  sample_size: the latent size pipelines default to (diffusers' field; jaxsd
    has no use for it).
  """
  if module.pooled_text_embedding:
    raise ValueError(
        f"model.pooled_text_embedding={module.pooled_text_embedding!r} is a "
        "jaxsd UNet feature with no UNet2DConditionModel equivalent: such a "
        "UNet cannot be exported to diffusers.")
  as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else v
  strip = lambda types: [t.removeprefix("Flax") for t in types]
  return {
      "_class_name": "UNet2DConditionModel",
      "sample_size": sample_size,
      "in_channels": module.in_channels,
      "out_channels": module.out_channels,
      "down_block_types": strip(module.down_block_types),
      "up_block_types": strip(module.up_block_types),
      "only_cross_attention": as_list(module.only_cross_attention),
      "block_out_channels": list(module.block_out_channels),
      "layers_per_block": module.layers_per_block,
      "attention_head_dim": as_list(module.attention_head_dim),
      "cross_attention_dim": module.cross_attention_dim,
      "norm_num_groups": module.norm_num_groups,
      "norm_eps": 1e-5,
      "flip_sin_to_cos": module.flip_sin_to_cos,
      "freq_shift": module.freq_shift,
      "use_linear_projection": module.use_linear_projection,
      "transformer_layers_per_block": as_list(
          module.transformer_layers_per_block),
      "dropout": module.dropout,
      "act_fn": "silu",
      "center_input_sample": False,
      "mid_block_type": "UNetMidBlock2DCrossAttn",
      "downsample_padding": 1,
      "mid_block_scale_factor": 1,
  }


# --- Names and layouts (generic: any module that keeps diffusers' names) -----

# PyTorch ModuleLists in the UNet: "resnets.1" is the Flax module "resnets_1".
# Other names ending in _<digit> ("linear_1") are PyTorch names as they are.
_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions",
          "transformer_blocks", "downsamplers", "upsamplers", "to_out", "net")


def torch_key(path: Tuple[str, ...], lists: Iterable[str] = _LISTS) -> str:
  """A Flax param path -> its PyTorch key: ("down_blocks_0", "resnets_1",
  "conv1", "kernel") -> "down_blocks.0.resnets.1.conv1.weight"."""
  *module, leaf = path
  names = []
  for name in module:
    base, _, index = name.rpartition("_")
    names.append(f"{base}.{index}" if index.isdigit() and base in lists
                 else name)
  return ".".join(names + ["weight" if leaf in ("kernel", "scale") else leaf])


torch_shape = torch_weights.torch_shape
to_torch_layout = torch_weights.to_torch_layout


def _listing(keys) -> str:
  keys = sorted(keys)
  more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
  return f"{keys[:5]}{more}"


def check_fits(tree: dict, expected: dict, source: str, what: str,
               key=torch_key, shape=torch_shape):
  """Raises ValueError unless `tree` has exactly `expected`'s params and
  shapes; messages name PyTorch keys and shapes (what the reader has)."""
  got = flax.traverse_util.flatten_dict(tree)
  want = flax.traverse_util.flatten_dict(expected)
  missing = [key(p) for p in set(want) - set(got)]
  extra = [key(p) for p in set(got) - set(want)]
  if missing or extra:
    raise ValueError(
        f"The weights of {source} do not fit the {what} its config describes"
        f": missing {_listing(missing)}, unexpected {_listing(extra)}.")
  wrong = [f"{key(p)} is {shape(p, got[p].shape)}, not "
           f"{shape(p, want[p].shape)}" for p in sorted(want)
           if tuple(got[p].shape) != tuple(want[p].shape)]
  if wrong:
    more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
    raise ValueError(f"The weights of {source} do not fit the {what} its "
                     f"config describes: {'; '.join(wrong[:3])}{more}.")


# --- Weights -----------------------------------------------------------------

def param_shapes(module: unet_lib.UNet) -> dict:
  """The module's param tree as ShapeDtypeStructs (nothing computed)."""
  n = len(module.block_out_channels)
  size = 2 ** (n - 1)  # any size whose down/up path round-trips
  sample = jnp.zeros((1, size, size, module.in_channels))
  context = jnp.zeros((1, 1, module.cross_attention_dim))
  return jax.eval_shape(
      lambda: module.init(jax.random.key(0), sample, jnp.zeros((1,)),
                          context))["params"]


def convert_diffusers_weights(
    state_dict: Dict[str, np.ndarray],
    module_or_cfg: Union[unet_lib.UNet, Dict[str, Any]],
    source: str = "the state dict") -> dict:
  """diffusers' UNet2DConditionModel PyTorch state dict -> jaxsd UNet params.

  Every param the module has must be present with its shape, and nothing
  else: a mismatch is a ValueError naming the keys (the usual cause: a
  config.json that does not describe these weights).
  """
  module = (module_or_cfg if isinstance(module_or_cfg, unet_lib.UNet)
            else unet_from_config(module_or_cfg))
  tree = torch_weights.to_flax_tree(
      {k: np.asarray(v, np.float32) for k, v in state_dict.items()})
  check_fits(tree, param_shapes(module), source, "UNet")
  return jax.tree_util.tree_map(jnp.asarray, tree)


def to_diffusers_weights(params) -> Dict[str, np.ndarray]:
  """jaxsd UNet params -> diffusers' UNet2DConditionModel state dict."""
  params = flax.core.unfreeze(params)
  jaxsd_only = sorted({"text_embedding", "text_pool_norm"} & set(params))
  if jaxsd_only:
    raise ValueError(
        f"params have {jaxsd_only}: model.pooled_text_embedding is a jaxsd "
        "UNet feature with no UNet2DConditionModel equivalent.")
  return {torch_key(p): to_torch_layout(p, v)
          for p, v in flax.traverse_util.flatten_dict(params).items()}


# --- Folders -----------------------------------------------------------------

def unet_folder(path: str) -> str:
  """The diffusers UNet folder at `path`: the folder itself if it holds a
  config.json, else a pipeline folder's `unet/`."""
  if not os.path.isdir(path):
    hint = (" (a hub id? jaxsd reads local folders: `huggingface-cli "
            f"download {path} --include 'unet/*'` fetches one)"
            if path.count("/") == 1 and not path.startswith((".", "/")) else "")
    raise FileNotFoundError(f"No folder {path}{hint}.")
  for folder in (path, os.path.join(path, "unet")):
    if os.path.isfile(os.path.join(folder, "config.json")):
      return folder
  raise FileNotFoundError(
      f"{path} is not a diffusers UNet folder: no config.json in it or in "
      "its unet/ subfolder.")


def _index_file(folder: str):
  for suffix in (".safetensors", ".bin"):
    path = os.path.join(folder, f"{WEIGHTS}{suffix}.index.json")
    if os.path.isfile(path):
      return path
  return None


def has_torch_weights(folder: str) -> bool:
  return bool(torch_weights.weight_file(folder, WEIGHTS) or _index_file(folder))


def read_weights(folder: str) -> Dict[str, np.ndarray]:
  """The folder's state dict: one weight file (torch_weights.read_weights),
  or the shards its `*.index.json` lists (big UNets are saved sharded)."""
  index = _index_file(folder)
  if torch_weights.weight_file(folder, WEIGHTS) or index is None:
    return torch_weights.read_weights(folder, WEIGHTS)
  with open(index) as f:
    shards = sorted(set(json.load(f)["weight_map"].values()))
  state_dict = {}
  for shard in shards:
    path = os.path.join(folder, shard)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{index} lists {shard}, which is not in "
                              f"{folder}.")
    state_dict.update(torch_weights.read_safetensors(path)
                      if shard.endswith(".safetensors")
                      else torch_checkpoint.load_state_dict(path))
  return state_dict


def load_config(path: str) -> Tuple[str, Dict[str, Any]]:
  """(the UNet folder at `path`, its config.json)."""
  folder = unet_folder(path)
  with open(os.path.join(folder, "config.json")) as f:
    return folder, json.load(f)


def load_diffusers(path: str, dtype: Dtype = jnp.float32
                   ) -> Tuple[unet_lib.UNet, dict]:
  """(module, params) of a diffusers UNet folder with PyTorch weights
  (config.json plus diffusion_pytorch_model.safetensors, .bin or their
  shards), or a pipeline folder holding one as `unet/`.

  Raises FileNotFoundError for a missing folder, config or weight file,
  ValueError for a config jaxsd does not implement or weights that do not
  fit it.
  """
  folder, cfg = load_config(path)
  module = unet_from_config(cfg, dtype, os.path.join(folder, "config.json"))
  params = convert_diffusers_weights(read_weights(folder), module, folder)
  return module, params


def save_diffusers(module: unet_lib.UNet, params, folder: str,
                   sample_size=None):
  """Writes `folder/config.json` and `diffusion_pytorch_model.safetensors`,
  a folder `UNet2DConditionModel.from_pretrained` loads."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  config = config_to_diffusers(module, sample_size)
  state_dict = to_diffusers_weights(params)
  check_fits(torch_weights.to_flax_tree(state_dict), param_shapes(module),
             "these params", "UNet")
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  safetensors.numpy.save_file(state_dict,
                              os.path.join(folder, WEIGHTS + ".safetensors"),
                              metadata={"format": "pt"})
