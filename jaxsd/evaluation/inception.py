"""The FID Inception-v3 (TF 2015-12-05 graph, as ported by pytorch-fid) in Flax.

Same network and weights as pytorch-fid's `FIDInceptionV3`, so FIDs compare
with published ones: torchvision's Inception3 with the FID patches (average
pools that exclude padding, a max pool in the last block) up to the 2048-d
global average pool ("pool3"). NHWC; submodule names follow the PyTorch state
dict, so `state_dict_to_variables` is a rename plus kernel transposes.

Weights are known by their content, not their name. pytorch-fid's file
carries the first 8 hex digits of its sha256 in its name
(`pt_inception-2015-12-05-6726825d.pth`, torch.hub's check_hash
convention), and that is checked:
- a file of that name (found in the cache, torch.hub's cache,
  $JAXSD_FID_INCEPTION_WEIGHTS or eval.inception_weights) whose sha256 does
  not start with 6726825d is refused (InceptionWeightsError): a damaged
  download or another network under the standard name;
- a file of any other name is used (it is asked for on purpose, by
  eval.inception_weights or $JAXSD_FID_INCEPTION_WEIGHTS), with a warning
  naming it when its sha256 is not the standard one: its FIDs do not compare
  with published ones.
`InceptionFeatures.identity` holds the weights' sha256 prefix, so the cached
reference statistics of one weights file are never used with another.
"""
import hashlib
import logging
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsd import environment
from jaxsd.errors import JaxsdError
from jaxsd.models import torch_checkpoint
from jaxsd.hub import WeightsUnavailableError, download

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/"
                   "fid_weights/pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub's check_hash convention
INPUT_SIZE = 299
FEATURE_DIM = 2048
IDENTITY = "fid-inception-v3-2015-12-05"
# Hex digits of the weights' sha256 in InceptionFeatures.identity: 64 bits,
# enough that two weights files never share a cache entry by chance.
FINGERPRINT_DIGITS = 16


class InceptionWeightsError(JaxsdError):
  """A file named as pytorch-fid's standard weights holds other bytes."""


def _pad(ph: int, pw: int):
  return ((ph, ph), (pw, pw))


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm (eps 1e-3, inference statistics) -> ReLU."""
  features: int
  kernel_size: Tuple[int, int]
  strides: Tuple[int, int] = (1, 1)
  padding: Any = ((0, 0), (0, 0))

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel_size, self.strides,
                padding=self.padding, use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # TF's average pool divides by the number of real (unpadded) pixels.
  return nn.avg_pool(x, (3, 3), (1, 1), padding=_pad(1, 1),
                     count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
  """35x35 block: 64 + 64 + 96 + pool_features channels."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv2d(64, (5, 5), padding=_pad(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(
        _avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Grid reduction 35 -> 17: 384 + 96 + in channels."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, (3, 3), (2, 2), name="branch3x3")(x)
    bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, (3, 3), (2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with factorised 7x7 convolutions: 4 x 192 channels."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, (1, 7), padding=_pad(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=_pad(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, (7, 1), padding=_pad(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, (1, 7), padding=_pad(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, (7, 1), padding=_pad(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, (1, 7), padding=_pad(0, 3),
                     name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Grid reduction 17 -> 8: 320 + 192 + in channels."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv2d(320, (3, 3), (2, 2), name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=_pad(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=_pad(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, (3, 3), (2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block with split 1x3 / 3x1 branches: 320 + 768 + 768 + 192 channels.

  The FID graph's last block (Mixed_7c) max-pools in its pool branch where
  the paper and torchvision average: `pool="max"` reproduces that.
  """
  pool: str = "avg"

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=_pad(0, 1), name="branch3x3_2a")(b3),
        BasicConv2d(384, (3, 1), padding=_pad(1, 0), name="branch3x3_2b")(b3),
    ], axis=-1)
    bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=_pad(0, 1),
                    name="branch3x3dbl_3a")(bd),
        BasicConv2d(384, (3, 1), padding=_pad(1, 0),
                    name="branch3x3dbl_3b")(bd),
    ], axis=-1)
    if self.pool == "max":
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=_pad(1, 1))
    else:
      pooled = _avg_pool_3x3(x)
    bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess(images, resize: bool = True) -> jnp.ndarray:
  """Images [B, H, W, 1 or 3] in [-1, 1] -> [B, 299, 299, 3] in [-1, 1].

  pytorch-fid resizes [0, 1] images with `F.interpolate(bilinear,
  align_corners=False)` (no antialiasing) and then maps them to [-1, 1];
  bilinear resizing commutes with that affine map, so resizing [-1, 1]
  directly is the same. Grey images are repeated to 3 channels.
  """
  images = jnp.asarray(images, jnp.float32)
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  if resize and images.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
    images = jax.image.resize(
        images, (images.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear",
        antialias=False)
  return images


class FIDInceptionV3(nn.Module):
  """Images [B, H, W, 1 or 3] in [-1, 1] -> pool3 features [B, 2048].

  Attributes:
    resize_input: resize to 299x299 as pytorch-fid does. Without it the
      network runs at the given size (>= 75x75), e.g. for small tests.
  """
  resize_input: bool = True

  @nn.compact
  def __call__(self, images):
    x = preprocess(images, self.resize_input)
    x = BasicConv2d(32, (3, 3), (2, 2), name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, (3, 3), padding=_pad(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    return x.mean(axis=(1, 2))


# --- Weights ----------------------------------------------------------------

# PyTorch parameter name -> (Flax collection, Flax name).
_LEAF_NAMES = {
    "conv.weight": ("params", "kernel"),
    "bn.weight": ("params", "scale"),
    "bn.bias": ("params", "bias"),
    "bn.running_mean": ("batch_stats", "mean"),
    "bn.running_var": ("batch_stats", "var"),
}


def state_dict_to_variables(state_dict: Mapping[str, np.ndarray],
                            model: Optional[FIDInceptionV3] = None
                            ) -> Dict[str, Any]:
  """pytorch-fid Inception state dict -> {"params", "batch_stats"} for `model`.

  Conv kernels go from OIHW to HWIO. Entries the feature network does not use
  (the 1008-way `fc`, BatchNorm's `num_batches_tracked`) are dropped; a missing
  or misshapen entry raises ValueError.
  """
  model = model or FIDInceptionV3()
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, 75, 75, 3), jnp.float32))
  flat = {}
  for key, value in state_dict.items():
    parts = key.split(".")
    leaf = ".".join(parts[-2:])
    if leaf not in _LEAF_NAMES:
      continue  # fc.*, *.num_batches_tracked
    collection, name = _LEAF_NAMES[leaf]
    value = np.asarray(value, np.float32)
    if name == "kernel":
      value = value.transpose(2, 3, 1, 0)
    flat[(collection, *parts[:-2], parts[-2], name)] = value
  expected = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(abstract))
  missing = sorted(".".join(k) for k in expected if k not in flat)
  if missing:
    raise ValueError(f"state dict lacks {len(missing)} Inception entries, "
                     f"e.g. {missing[:3]}")
  for k, spec in expected.items():
    if flat[k].shape != spec.shape:
      raise ValueError(f"{'.'.join(k)}: shape {flat[k].shape}, expected "
                       f"{spec.shape}")
  return flax.traverse_util.unflatten_dict(
      {k: jnp.asarray(flat[k]) for k in expected})


def _candidate_paths(cache_dir: Optional[str]) -> Sequence[str]:
  paths = []
  if environment.get("JAXSD_FID_INCEPTION_WEIGHTS"):
    paths.append(environment.get("JAXSD_FID_INCEPTION_WEIGHTS"))
  if cache_dir:
    paths.append(os.path.join(cache_dir, FID_WEIGHTS_FILE))
  # Where pytorch-fid (torch.hub) keeps it, so an existing download is reused.
  torch_home = environment.get("TORCH_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache", "torch")
  paths.append(os.path.join(torch_home, "hub", "checkpoints", FID_WEIGHTS_FILE))
  return paths


_SHA256_MEMO: Dict[Tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
  """The file's sha256, hex (remembered per path, size and mtime: one read
  of ~95 MB, about 0.3 s, per process)."""
  stat = os.stat(path)
  key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
  if key not in _SHA256_MEMO:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
      while chunk := f.read(1 << 20):
        digest.update(chunk)
    _SHA256_MEMO[key] = digest.hexdigest()
  return _SHA256_MEMO[key]


def check_weights_file(path: str) -> str:
  """The weights file's sha256 after the checks in the module docstring.

  Raises:
    InceptionWeightsError: the file has the standard name but not its hash.
  """
  sha256 = file_sha256(path)
  standard = sha256.startswith(FID_WEIGHTS_SHA256_PREFIX)
  if os.path.basename(path) == FID_WEIGHTS_FILE and not standard:
    raise InceptionWeightsError(
        f"{path} is named as pytorch-fid's Inception weights but its sha256 "
        f"starts with {sha256[:8]}, not {FID_WEIGHTS_SHA256_PREFIX}: a damaged "
        f"or different file. Delete it (jaxsd downloads the real one from "
        f"{FID_WEIGHTS_URL}), or rename it and set eval.inception_weights to "
        "use it on purpose.")
  if not standard:
    logging.warning(
        "FID Inception weights %s (sha256 %s...) are not pytorch-fid's %s "
        "(sha256 %s...): FIDs computed with them do not compare with "
        "published ones; "
        "reference statistics are cached for this file alone.", path,
        sha256[:FINGERPRINT_DIGITS], FID_WEIGHTS_FILE,
        FID_WEIGHTS_SHA256_PREFIX)
  return sha256


def fid_weights_path(weights_path: Optional[str] = None,
                     cache_dir: Optional[str] = None,
                     allow_download: bool = True) -> str:
  """Local path of pytorch-fid's Inception weights, downloading if needed.

  Looks at `weights_path` (only there, when given), then
  `$JAXSD_FID_INCEPTION_WEIGHTS`, `cache_dir`, and torch.hub's cache; else
  downloads `FID_WEIGHTS_URL` into `cache_dir` when GitHub answers within a
  few seconds (its sha256 checked). The path is not checked here:
  `check_weights_file` does that.

  Raises:
    WeightsUnavailableError: no file, and no download possible.
  """
  if weights_path:
    if os.path.exists(weights_path):
      return weights_path
    raise WeightsUnavailableError(
        f"FID Inception weights not found at {weights_path}")
  for path in _candidate_paths(cache_dir):
    if os.path.exists(path):
      return path
  if not allow_download or not cache_dir:
    why = ("no cache_dir to download into" if allow_download
           else "downloads are off")
    raise WeightsUnavailableError(
        f"FID Inception weights ({FID_WEIGHTS_FILE}) not found locally and "
        f"{why}; get them from {FID_WEIGHTS_URL}")
  return download(FID_WEIGHTS_URL, os.path.join(cache_dir, FID_WEIGHTS_FILE),
                  sha256_prefix=FID_WEIGHTS_SHA256_PREFIX)


def variables_sha256(variables) -> str:
  """sha256 of the variables' names and float32 bytes: the fingerprint of
  weights that come from no file."""
  digest = hashlib.sha256()
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  for key in sorted(flat):
    digest.update("/".join(key).encode())
    digest.update(np.ascontiguousarray(flat[key], np.float32).tobytes())
  return digest.hexdigest()


class InceptionFeatures:
  """Host-side FID Inception: batched, jitted pool3 features of numpy images.

  Attributes:
    identity: names the network and its weights in cached statistics,
      `fid-inception-v3-2015-12-05-sha256-<16 hex digits>`: the weights
      file's sha256 (`sha256`), else the variables' own
      (`variables_sha256`).
  """

  def __init__(self, variables, resize_input: bool = True,
               sha256: Optional[str] = None):
    self.model = FIDInceptionV3(resize_input=resize_input)
    self.variables = variables
    sha256 = sha256 or variables_sha256(variables)
    self.identity = f"{IDENTITY}-sha256-{sha256[:FINGERPRINT_DIGITS]}"
    self._apply = jax.jit(self.model.apply)

  def __call__(self, images, batch_size: int = 50) -> np.ndarray:
    """images [N, H, W, 1 or 3] in [-1, 1] -> float32 [N, 2048].

    The last batch is padded, so one compiled shape serves any N.
    """
    images = np.asarray(images, np.float32)
    if images.ndim == 3:
      images = images[..., None]
    out = []
    for i in range(0, images.shape[0], batch_size):
      batch = images[i:i + batch_size]
      n = batch.shape[0]
      if n < batch_size:
        batch = np.concatenate(
            [batch, np.zeros((batch_size - n,) + batch.shape[1:], np.float32)])
      out.append(np.asarray(self._apply(self.variables, batch))[:n])
    if not out:
      return np.zeros((0, FEATURE_DIM), np.float32)
    return np.concatenate(out)


def load_fid_inception(weights_path: Optional[str] = None,
                       cache_dir: Optional[str] = None,
                       allow_download: bool = True,
                       resize_input: bool = True) -> InceptionFeatures:
  """The FID Inception with pytorch-fid's published weights (no torch needed).

  The weights file is checked by its sha256 (see the module docstring), and
  the result's `identity` carries that hash.

  Raises:
    WeightsUnavailableError: weights missing and not downloadable (offline);
      callers skip Inception-FID with one log line.
    InceptionWeightsError: a file of the standard name with another hash.
  """
  path = fid_weights_path(weights_path, cache_dir, allow_download)
  sha256 = check_weights_file(path)
  logging.info("loading FID Inception weights from %s (sha256 %s...)", path,
               sha256[:FINGERPRINT_DIGITS])
  model = FIDInceptionV3(resize_input=resize_input)
  variables = state_dict_to_variables(
      torch_checkpoint.load_state_dict(path), model)
  return InceptionFeatures(variables, resize_input=resize_input,
                           sha256=sha256)
