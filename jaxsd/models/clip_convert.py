"""CLIP models from PyTorch weights, and text encoders back: jaxsd's own
conversion.

transformers' PyTorch CLIP models and their Flax twins share one module tree;
only the leaf names and the linear and conv layouts differ:

  text_model.embeddings.token_embedding.weight [V, D] -> .../embedding [V, D]
  text_model.encoder.layers.3.self_attn.q_proj.weight [O, I]
      -> text_model/encoder/layers/3/self_attn/q_proj/kernel [I, O]
  text_model.encoder.layers.3.layer_norm1.weight -> .../layer_norm1/scale
  vision_model.embeddings.patch_embedding.weight [D, C, p, p]
      -> vision_model/embeddings/patch_embedding/kernel [p, p, C, D]
  vision_model.embeddings.class_embedding [D], logit_scale [] -> same names

(Flax's layer collection names its layers "0", "1", ..., not "layers_0").
Two key layouts of a text encoder are read: transformers 4 saves
`CLIPTextModel` with a `text_model.` prefix, transformers 5 without one
(`embeddings.*`, `encoder.*`, `final_layer_norm.*`), as a pipeline saved by
today's PyTorch diffusers holds it.

Weights come through `torch_weights` (our safetensors reader, or a `.bin`
through the restricted weights-only unpickler), so loading needs no torch and
runs no pickled code; transformers' `from_pt=True` would import torch (and
fails with `_do_init=False`).

- `convert_clip_text_weights(state_dict, config)`: PyTorch state dict ->
  FlaxCLIPTextModule params `{"text_model": ...}`, strict on names and shapes.
- `to_clip_text_weights(params)`: the inverse, a state dict that
  `CLIPTextModel.load_state_dict(..., strict=True)` accepts.
- `load_text_encoder(folder)`: (module, params, config) of a `text_encoder/`
  folder or of an SD pipeline folder holding one.
- `save_text_encoder(config, params, folder)`: config.json + model.safetensors
  that `transformers.CLIPTextModel.from_pretrained(folder)` loads.
- `convert_clip_weights(state_dict, config)` / `load_clip_model(folder)`: a
  whole PyTorch `CLIPModel` (both towers, projections, logit scale) as
  FlaxCLIPModel params, for the CLIP score.
"""
import json
import os
import struct
from typing import Any, Dict, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxsd.models import torch_checkpoint
from jaxsd.models import torch_weights

# Weight file stems transformers writes: model.safetensors, pytorch_model.bin.
WEIGHT_STEMS = ("model", "pytorch_model")
FLAX_WEIGHTS = "flax_model.msgpack"
# Buffers, not parameters: position_ids is arange(max_positions), rebuilt by
# both models (and a non-persistent buffer, absent from state dicts, since
# transformers 4.31).
_BUFFERS = ("text_model.embeddings.position_ids",
            "vision_model.embeddings.position_ids")
# The text tower's prefix in transformers 4's CLIPTextModel state dict, and
# the roots of its keys without it (transformers 5's CLIPTextModel).
_TEXT_PREFIX = "text_model."
_TEXT_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")
# Not the text tower: CLIPTextModelWithProjection's (SDXL's text_encoder_2)
# projection to the joint image-text space, and a whole CLIPModel's vision
# tower, its projection and logit scale. None of them shapes the last hidden
# states jaxsd encodes with.
_NOT_TEXT_TOWER = ("text_projection.", "vision_model.", "visual_projection.",
                   "logit_scale")
# config.json model types: a text encoder, or a whole CLIP (its text tower
# is read, the vision tower and projections ignored).
_MODEL_TYPES = ("clip_text_model", "clip")


def _flax_activations():
  from transformers import modeling_flax_utils  # pylint: disable=g-import-not-at-top
  return modeling_flax_utils.ACT2FN


# --- Names and layouts -------------------------------------------------------


def _flax_path(key: str, ndim: int) -> Tuple[Tuple[str, ...], bool]:
  """A PyTorch key of an ndim-d tensor -> (its Flax param path, whether it is
  a kernel to take to Flax's layout: linear [O, I] -> [I, O], conv
  [O, I, kh, kw] -> [kh, kw, I, O])."""
  *module, leaf = key.split(".")
  transpose = False
  if leaf == "weight":
    name = module[-1] if module else ""
    if ndim == 4:  # the vision tower's patch embedding, a conv
      leaf, transpose = "kernel", True
    elif name.endswith("embedding"):
      leaf = "embedding"
    elif "norm" in name:  # layer_norm1, final_layer_norm, pre_layrnorm, ...
      leaf = "scale"
    else:
      leaf, transpose = "kernel", True
  return tuple(module) + (leaf,), transpose


def _flax_layout(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  return value.T


def _torch_key(path: Tuple[str, ...]) -> str:
  *module, leaf = path
  return ".".join(list(module) + ["weight" if leaf in ("kernel", "scale",
                                                       "embedding") else leaf])


def _flatten(tree, prefix=()) -> Dict[Tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if hasattr(v, "items"):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Dict[Tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return tree


def _module(config):
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.FlaxCLIPTextModel(config, _do_init=False).module


def expected_params(config) -> Dict[Tuple[str, ...], jax.ShapeDtypeStruct]:
  """The FlaxCLIPTextModule's param shapes for `config`, by path (no
  computation: jax.eval_shape of its init)."""
  module = _module(config)
  ids = jnp.zeros((1, 1), jnp.int32)
  tree = jax.eval_shape(lambda: module.init(
      jax.random.key(0), ids, jnp.ones_like(ids), jnp.zeros_like(ids),
      deterministic=True)["params"])
  return _flatten(tree)


def _list(keys, n=6):
  keys = sorted(keys)
  return f"{keys[:n]}{'...' if len(keys) > n else ''}"


def with_text_prefix(state_dict: Dict[str, Any]) -> Dict[str, Any]:
  """The state dict with transformers 4's `text_model.` key layout.

  transformers 5 saves a CLIPTextModel (and CLIPTextModelWithProjection)
  without the prefix; a state dict with any `text_model.` key is taken as
  transformers 4's and returned unchanged, so the two layouts never mix.
  """
  if any(k.startswith(_TEXT_PREFIX) for k in state_dict):
    return state_dict
  return {(_TEXT_PREFIX + k if k.startswith(_TEXT_ROOTS) else k): v
          for k, v in state_dict.items()}


def _float32(value) -> np.ndarray:
  value = np.asarray(value)
  if value.dtype.kind == "f" or value.dtype == ml_dtypes.bfloat16:
    value = value.astype(np.float32)  # f16 / bf16 files: compute in float32
  return value


def _convert(state_dict: Dict[str, Any],
             want: Dict[Tuple[str, ...], jax.ShapeDtypeStruct], source: str,
             what: str) -> dict:
  """state_dict (minus buffers) -> the param tree `want` describes, strict on
  names and shapes; errors name `what` the config describes."""
  got = {}
  for key, value in state_dict.items():
    if key in _BUFFERS:
      continue
    value = _float32(value)
    path, transpose = _flax_path(key, value.ndim)
    got[path] = (value, transpose)
  missing = [_torch_key(p) for p in set(want) - set(got)]
  extra = [_torch_key(p) for p in set(got) - set(want)]
  if missing or extra:
    raise ValueError(
        f"The weights of {source} do not fit the {what} its config "
        f"describes: missing {_list(missing)}, unexpected {_list(extra)}.")
  out = {}
  for path, spec in want.items():
    value, transpose = got[path]
    if transpose:
      if value.ndim not in (2, 4):
        raise ValueError(f"{source}: {_torch_key(path)} has shape "
                         f"{value.shape}; a linear weight is 2-d.")
      value = _flax_layout(value)
    if value.shape != spec.shape:
      raise ValueError(
          f"{source}: {_torch_key(path)} has shape "
          f"{torch_weights.torch_shape(path, value.shape)}, the config needs "
          f"{torch_weights.torch_shape(path, spec.shape)}.")
    # np.asarray, not ascontiguousarray: that makes logit_scale [] a [1].
    out[path] = jnp.asarray(np.asarray(value, order="C"))
  return _unflatten(out)


def convert_clip_text_weights(state_dict: Dict[str, Any], config,
                              source: str = "the state dict") -> dict:
  """PyTorch CLIPTextModel state dict -> FlaxCLIPTextModule params.

  Args:
    state_dict: name -> array (numpy, or anything np.asarray takes) with
      transformers' names, with or without the `text_model.` prefix
      (transformers 4 / 5). `position_ids` buffers are dropped;
      CLIPTextModelWithProjection's `text_projection.weight` is ignored (a
      note is logged), and so are a whole CLIPModel's vision_model.*,
      visual_projection and logit_scale.
    config: the transformers.CLIPTextConfig the weights were saved with.
    source: named in errors (a folder).

  Returns:
    {"text_model": {...}} float32 jnp arrays, the tree FlaxCLIPTextModel's
    module applies with.

  Raises:
    ValueError: naming the missing and unexpected PyTorch keys, or a key whose
      shape does not fit the config.
  """
  state_dict = with_text_prefix(state_dict)
  ignored = [k for k in state_dict if k.startswith(_NOT_TEXT_TOWER)]
  if ignored:
    logging.info("%s: ignoring %s (not part of the text encoder's last hidden "
                 "states).", source, _list(ignored, 3))
  kept = {k: v for k, v in state_dict.items() if k not in ignored}
  return _convert(kept, expected_params(config), source, "CLIPTextModel")


def to_clip_text_weights(params) -> Dict[str, np.ndarray]:
  """FlaxCLIPTextModule params -> a PyTorch CLIPTextModel state dict
  (float32 numpy, C order), loadable with strict=True.

  position_ids is left out: a non-persistent buffer in transformers 4.57's
  CLIPTextModel, so a strict load expects it absent.
  """
  return {_torch_key(path): torch_weights.to_torch_layout(path, value)
          for path, value in _flatten(params).items()}


# --- Folders ------------------------------------------------------------------


def text_encoder_folder(path: str) -> Optional[str]:
  """The transformers text encoder folder at `path`: the folder itself if it
  holds a config.json, else the `text_encoder/` of a pipeline folder; None if
  neither."""
  for folder in (path, os.path.join(path, "text_encoder")):
    if os.path.isfile(os.path.join(folder, "config.json")):
      return folder
  return None


def has_flax_weights(folder: str) -> bool:
  return os.path.isfile(os.path.join(folder, FLAX_WEIGHTS))


def pytorch_weight_file(folder: str) -> Optional[str]:
  """The folder's PyTorch weights: model.safetensors, pytorch_model.bin, or
  the index of a sharded one of these; None if none."""
  for stem in WEIGHT_STEMS:
    for suffix in (".safetensors", ".bin"):
      for name in (stem + suffix, stem + suffix + ".index.json"):
        if os.path.isfile(os.path.join(folder, name)):
          return os.path.join(folder, name)
  return None


def read_pytorch_weights(folder: str, what: str = "text encoder"
                         ) -> Dict[str, np.ndarray]:
  """The folder's PyTorch state dict, sharded or not, via torch_weights
  (never a full pickle load)."""
  path = pytorch_weight_file(folder)
  if path is None:
    raise FileNotFoundError(
        f"No {what} weights in {folder}: expected model.safetensors or "
        f"pytorch_model.bin (or a sharded *.index.json of one), or "
        f"{FLAX_WEIGHTS} for the Flax path.")
  if not path.endswith(".index.json"):
    stem = os.path.basename(path).rsplit(".", 1)[0]
    return torch_weights.read_weights(folder, stem)
  with open(path) as f:
    weight_map = json.load(f)["weight_map"]
  out = {}
  for shard in sorted(set(weight_map.values())):
    shard_path = os.path.join(folder, shard)
    if os.path.basename(shard) != shard or not os.path.isfile(shard_path):
      raise FileNotFoundError(f"{path} names the shard {shard!r}, which is "
                              f"not a file in {folder}.")
    if shard.endswith(".safetensors"):
      out.update(torch_weights.read_safetensors(shard_path))
    else:
      out.update(torch_checkpoint.load_state_dict(shard_path))
  return out


def config_from_dict(cfg: Dict[str, Any], source: str = "config.json"):
  """A transformers.CLIPTextConfig from a config.json's dict; what the Flax
  module cannot run is refused."""
  import transformers  # pylint: disable=g-import-not-at-top
  model_type = cfg.get("model_type")
  if model_type not in _MODEL_TYPES:
    raise ValueError(
        f"{source} describes model_type={model_type!r}; jaxsd's text encoder "
        f"is CLIP's ({' or '.join(map(repr, _MODEL_TYPES))}).")
  if model_type == "clip":  # CLIPConfig knows its older layouts too
    config = transformers.CLIPConfig.from_dict(cfg).text_config
  else:
    config = transformers.CLIPTextConfig.from_dict(cfg)
  act = config.hidden_act
  if act not in _flax_activations():
    raise ValueError(
        f"{source}: hidden_act={act!r} has no Flax implementation in "
        f"transformers (FlaxCLIPTextModel runs {sorted(_flax_activations())}).")
  return config


def load_text_encoder(folder: str) -> Tuple[Any, dict, Any]:
  """(module, params, config) of transformers CLIP text encoder PyTorch
  weights.

  Args:
    folder: a `text_encoder/` folder (config.json plus model.safetensors or
      pytorch_model.bin, possibly sharded), or an SD pipeline folder holding
      one.

  Returns:
    module: FlaxCLIPTextModule, applied as FlaxCLIPTextModel's module is:
      `module.apply({"params": params}, ids, mask, positions,
      deterministic=True)[0]` -> last hidden states [B, L, D].
    params: {"text_model": ...} float32.
    config: transformers.CLIPTextConfig.
  """
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"Text encoder folder {folder} does not exist.")
  resolved = text_encoder_folder(folder)
  if resolved is None:
    raise FileNotFoundError(
        f"No config.json in {folder} or {os.path.join(folder, 'text_encoder')}"
        ": a text encoder folder holds transformers' config.json and its "
        "weights.")
  path = os.path.join(resolved, "config.json")
  with open(path) as f:
    try:
      cfg = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not JSON: {e}") from None
  config = config_from_dict(cfg, path)
  params = convert_clip_text_weights(read_pytorch_weights(resolved), config,
                                     resolved)
  return _module(config), params, config


# --- A whole CLIPModel (the CLIP score's) -----------------------------------


def clip_config_from_dict(cfg: Dict[str, Any], source: str = "config.json"):
  """A transformers.CLIPConfig from a CLIPModel's config.json dict; what the
  Flax module cannot run is refused."""
  import transformers  # pylint: disable=g-import-not-at-top
  if cfg.get("model_type") != "clip":
    raise ValueError(
        f"{source} describes model_type={cfg.get('model_type')!r}; a CLIP "
        "score model is a whole CLIPModel (model_type 'clip'), both towers.")
  config = transformers.CLIPConfig.from_dict(cfg)
  for tower in (config.text_config, config.vision_config):
    if tower.hidden_act not in _flax_activations():
      raise ValueError(
          f"{source}: hidden_act={tower.hidden_act!r} has no Flax "
          f"implementation in transformers (FlaxCLIPModel runs "
          f"{sorted(_flax_activations())}).")
  return config


def expected_clip_params(model) -> Dict[Tuple[str, ...],
                                        jax.ShapeDtypeStruct]:
  """A FlaxCLIPModel's (made with _do_init=False) param shapes, by path."""
  return _flatten(jax.eval_shape(
      lambda key: model.init_weights(key, model.input_shape),
      jax.random.key(0)))


def convert_clip_weights(state_dict: Dict[str, Any], config,
                         source: str = "the state dict") -> dict:
  """PyTorch CLIPModel state dict -> FlaxCLIPModel params.

  Args:
    state_dict: name -> array with transformers' CLIPModel names
      (text_model.*, vision_model.*, text_projection.weight,
      visual_projection.weight, logit_scale); position_ids buffers dropped.
    config: the transformers.CLIPConfig the weights were saved with.
    source: named in errors (a folder).

  Returns:
    {"text_model", "vision_model", "text_projection", "visual_projection",
    "logit_scale"} float32 jnp arrays, the params FlaxCLIPModel's
    get_text_features / get_image_features take.

  Raises:
    ValueError: naming the missing and unexpected PyTorch keys, or a key
      whose shape does not fit the config.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.FlaxCLIPModel(config, _do_init=False)
  return _convert(state_dict, expected_clip_params(model), source,
                  "CLIPModel")


def load_clip_model(folder: str) -> Tuple[Any, dict]:
  """(transformers.FlaxCLIPModel made with _do_init=False, its params) of a
  folder of PyTorch CLIPModel weights (config.json plus model.safetensors or
  pytorch_model.bin, possibly sharded), as `save_pretrained` writes it and
  the hub ships it. No torch import, no pickled code run.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No config.json in {folder}: a CLIP model "
                            "folder holds transformers' config.json and its "
                            "weights.")
  with open(path) as f:
    try:
      cfg = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not JSON: {e}") from None
  config = clip_config_from_dict(cfg, path)
  params = convert_clip_weights(read_pytorch_weights(folder, "CLIP model"),
                                config, folder)
  return transformers.FlaxCLIPModel(config, _do_init=False), params


# --- Export -------------------------------------------------------------------

_SAFETENSORS_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                      np.dtype(ml_dtypes.bfloat16): "BF16",
                      np.dtype(np.float64): "F64", np.dtype(np.int64): "I64",
                      np.dtype(np.int32): "I32"}


def write_safetensors(path: str, tensors: Dict[str, np.ndarray],
                      metadata: Optional[Dict[str, str]] = None):
  """Writes name -> array as a .safetensors file (the format torch_weights.
  read_safetensors reads): 8-byte header length, JSON header, raw bytes."""
  header: Dict[str, Any] = {}
  if metadata:
    header["__metadata__"] = dict(metadata)
  offset, blobs = 0, []
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    dtype = _SAFETENSORS_NAMES.get(array.dtype)
    if dtype is None:
      raise ValueError(f"{name}: dtype {array.dtype} is not written.")
    blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    header[name] = {"dtype": dtype, "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(blob)]}
    offset += len(blob)
    blobs.append(blob)
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # keep the tensors 8-byte aligned
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for blob in blobs:
      f.write(blob)
  os.replace(tmp, path)


def save_text_encoder(config, params, folder: str):
  """Writes `folder/config.json` and `folder/model.safetensors`, a folder
  `transformers.CLIPTextModel.from_pretrained` (and `load_text_encoder`)
  loads.

  config: the transformers.CLIPTextConfig; params: FlaxCLIPTextModule params
  ({"text_model": ...}).
  """
  os.makedirs(folder, exist_ok=True)
  state_dict = to_clip_text_weights(params)
  want = {_torch_key(p) for p in expected_params(config)}
  if set(state_dict) != want:
    raise ValueError(
        f"The params do not fit the config: missing "
        f"{_list(want - set(state_dict))}, unexpected "
        f"{_list(set(state_dict) - want)}.")
  cfg = config.to_dict()
  cfg["model_type"] = "clip_text_model"
  cfg["architectures"] = ["CLIPTextModel"]
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
  write_safetensors(os.path.join(folder, "model.safetensors"), state_dict,
                    {"format": "pt"})
