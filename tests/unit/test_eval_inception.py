"""FID Inception in Flax vs an independent PyTorch rebuild of pytorch-fid's net.

Random weights go through the real path: torch.save -> our torch-free .pth
reader -> state-dict converter -> Flax; the PyTorch model loads the same state
dict natively.
"""
import collections
import hashlib
import logging
import os
import time

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jaxsd import errors
from jaxsd import hub
from jaxsd.evaluation import inception
from jaxsd.models import torch_checkpoint


# --- PyTorch reference: torchvision Inception3 layers + pytorch-fid patches --


class TorchBasicConv2d(nn.Module):

  def __init__(self, cin, cout, **kwargs):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class TorchFIDInceptionA(nn.Module):

  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = TorchBasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = TorchBasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = TorchBasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = TorchBasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = TorchBasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = TorchBasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = TorchBasicConv2d(cin, pool_features, kernel_size=1)

  def forward(self, x):
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
    return torch.cat([b1, b5, b3, bp], 1)


class TorchInceptionB(nn.Module):

  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = TorchBasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = TorchBasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = TorchBasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = TorchBasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([b3, bd, F.max_pool2d(x, 3, 2)], 1)


class TorchFIDInceptionC(nn.Module):

  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = TorchBasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = TorchBasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = TorchBasicConv2d(c7, c7, kernel_size=(1, 7),
                                        padding=(0, 3))
    self.branch7x7_3 = TorchBasicConv2d(c7, 192, kernel_size=(7, 1),
                                        padding=(3, 0))
    self.branch7x7dbl_1 = TorchBasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = TorchBasicConv2d(c7, c7, kernel_size=(7, 1),
                                           padding=(3, 0))
    self.branch7x7dbl_3 = TorchBasicConv2d(c7, c7, kernel_size=(1, 7),
                                           padding=(0, 3))
    self.branch7x7dbl_4 = TorchBasicConv2d(c7, c7, kernel_size=(7, 1),
                                           padding=(3, 0))
    self.branch7x7dbl_5 = TorchBasicConv2d(c7, 192, kernel_size=(1, 7),
                                           padding=(0, 3))
    self.branch_pool = TorchBasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = layer(bd)
    bp = self.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
    return torch.cat([b1, b7, bd, bp], 1)


class TorchInceptionD(nn.Module):

  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = TorchBasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = TorchBasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = TorchBasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = TorchBasicConv2d(192, 192, kernel_size=(1, 7),
                                          padding=(0, 3))
    self.branch7x7x3_3 = TorchBasicConv2d(192, 192, kernel_size=(7, 1),
                                          padding=(3, 0))
    self.branch7x7x3_4 = TorchBasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_1(x)
    for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      b7 = layer(b7)
    return torch.cat([b3, b7, F.max_pool2d(x, 3, 2)], 1)


class TorchFIDInceptionE(nn.Module):

  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = TorchBasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = TorchBasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = TorchBasicConv2d(384, 384, kernel_size=(1, 3),
                                         padding=(0, 1))
    self.branch3x3_2b = TorchBasicConv2d(384, 384, kernel_size=(3, 1),
                                         padding=(1, 0))
    self.branch3x3dbl_1 = TorchBasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = TorchBasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = TorchBasicConv2d(384, 384, kernel_size=(1, 3),
                                            padding=(0, 1))
    self.branch3x3dbl_3b = TorchBasicConv2d(384, 384, kernel_size=(3, 1),
                                            padding=(1, 0))
    self.branch_pool = TorchBasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    if self.max_pool:
      pooled = F.max_pool2d(x, 3, 1, 1)
    else:
      pooled = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class TorchFIDInceptionV3(nn.Module):
  """pytorch-fid's InceptionV3(output_blocks=[3]) forward, input in [0, 1]."""

  def __init__(self, resize_input):
    super().__init__()
    self.resize_input = resize_input
    self.Conv2d_1a_3x3 = TorchBasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = TorchBasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = TorchBasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = TorchBasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = TorchBasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b = TorchFIDInceptionA(192, 32)
    self.Mixed_5c = TorchFIDInceptionA(256, 64)
    self.Mixed_5d = TorchFIDInceptionA(288, 64)
    self.Mixed_6a = TorchInceptionB(288)
    self.Mixed_6b = TorchFIDInceptionC(768, 128)
    self.Mixed_6c = TorchFIDInceptionC(768, 160)
    self.Mixed_6d = TorchFIDInceptionC(768, 160)
    self.Mixed_6e = TorchFIDInceptionC(768, 192)
    self.Mixed_7a = TorchInceptionD(768)
    self.Mixed_7b = TorchFIDInceptionE(1280, max_pool=False)
    self.Mixed_7c = TorchFIDInceptionE(2048, max_pool=True)
    self.fc = nn.Linear(2048, 1008)  # in the published file, unused for FID

  def forward(self, x):
    if self.resize_input:
      x = F.interpolate(x, size=(299, 299), mode="bilinear",
                        align_corners=False)
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, 3, 2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, 3, 2)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                 "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b",
                 "Mixed_7c"):
      x = getattr(self, name)(x)
    return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def _randomise(model: nn.Module, seed: int = 0) -> None:
  """Random weights and BatchNorm statistics that keep activations O(1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.Conv2d):
        fan_in = module.weight[0].numel()
        module.weight.normal_(0, (2 / fan_in)**0.5, generator=gen)
      elif isinstance(module, nn.BatchNorm2d):
        c = module.num_features
        module.weight.copy_(0.5 + torch.rand(c, generator=gen))
        module.bias.copy_(0.2 * torch.randn(c, generator=gen))
        module.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
        module.running_var.copy_(0.5 + torch.rand(c, generator=gen))


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
  """(torch reference at 107x107 input, path of its saved state dict)."""
  torch.manual_seed(0)
  model = TorchFIDInceptionV3(resize_input=False).eval()
  _randomise(model)
  path = str(tmp_path_factory.mktemp("inception") / "random_inception.pth")
  # The legacy stream format: the published file predates torch's zip format.
  torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
  return model, path


def test_flax_inception_matches_torch_reference(random_inception):
  torch_model, path = random_inception
  # 107x107: the smallest-ish size whose last blocks still see a 2x2 map, so
  # their 3x3 / 1x3 / 3x1 kernels and pools are exercised away from padding.
  images01 = np.random.RandomState(1).rand(2, 3, 107, 107).astype(np.float32)
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(images01)).numpy()

  features = inception.load_fid_inception(weights_path=path,
                                          resize_input=False)
  got = features(images01.transpose(0, 2, 3, 1) * 2 - 1, batch_size=2)

  assert got.shape == (2, 2048)
  assert np.std(expected) > 0.1  # the random net is not degenerate
  # Observed max error ~1e-6 of the feature scale; a wrong pool or padding
  # is off by ~0.3 of it.
  np.testing.assert_allclose(got, expected, rtol=1e-3,
                             atol=1e-4 * np.abs(expected).max())


def test_full_size_pipeline_on_mnist_sized_grey_images(random_inception):
  """28x28 grey in [-1, 1] -> 299x299 RGB -> features, as pytorch-fid does."""
  torch_model, path = random_inception
  torch_model.resize_input = True
  grey01 = np.random.RandomState(2).rand(3, 1, 28, 28).astype(np.float32)
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(grey01).repeat(1, 3, 1, 1)).numpy()
  torch_model.resize_input = False

  features = inception.load_fid_inception(weights_path=path)
  got = features(grey01.transpose(0, 2, 3, 1) * 2 - 1, batch_size=2)

  assert got.shape == (3, 2048)
  np.testing.assert_allclose(got, expected, rtol=1e-3,
                             atol=1e-4 * np.abs(expected).max())


def test_preprocess_matches_torch_interpolate():
  """Resize to 299 like pytorch-fid, up (MNIST) and down, grey -> RGB."""
  rng = np.random.RandomState(0)
  for size, channels in ((28, 1), (512, 3)):
    images01 = rng.rand(2, size, size, channels).astype(np.float32)
    ref = torch.from_numpy(images01.transpose(0, 3, 1, 2))
    ref = ref.expand(-1, 3, -1, -1)
    ref = F.interpolate(ref, size=(299, 299), mode="bilinear",
                        align_corners=False)
    ref = (2 * ref - 1).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(inception.preprocess(images01 * 2 - 1))
    assert got.shape == (2, 299, 299, 3)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_converter_maps_every_tensor(random_inception):
  torch_model, path = random_inception
  state = torch_checkpoint.load_state_dict(path)
  variables = inception.state_dict_to_variables(state)
  kernel = variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
  torch_kernel = torch_model.Mixed_6b.branch7x7_2.conv.weight.detach().numpy()
  np.testing.assert_array_equal(kernel, torch_kernel.transpose(2, 3, 1, 0))
  var = variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"]
  np.testing.assert_array_equal(
      var, torch_model.Mixed_7c.branch_pool.bn.running_var.numpy())
  n_flax = sum(x.size for x in jax.tree_util.tree_leaves(variables))
  n_torch = sum(v.numel() for k, v in torch_model.state_dict().items()
                if not k.startswith("fc.") and "num_batches" not in k)
  assert n_flax == n_torch

  del state["Mixed_5b.branch_pool.bn.running_var"]
  with pytest.raises(ValueError, match="lacks"):
    inception.state_dict_to_variables(state)


def test_torch_file_reader_both_formats(tmp_path):
  base = torch.arange(20, dtype=torch.float32)
  state = collections.OrderedDict(
      w=torch.randn(4, 3, 2, 2), t=torch.randn(5, 6).t(), view=base[3:9],
      half=torch.randn(3).half(), long=torch.tensor(7), bf=torch.randn(
          2, 2).to(torch.bfloat16))
  for zip_format in (True, False):
    path = str(tmp_path / f"s{zip_format}.pth")
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    loaded = torch_checkpoint.load_state_dict(path)
    assert list(loaded) == list(state)
    for key, value in state.items():
      ref = value.float().numpy() if key == "bf" else value.numpy()
      got = loaded[key].astype(np.float32) if key == "bf" else loaded[key]
      assert got.shape == ref.shape
      np.testing.assert_array_equal(got, ref)
  # Arbitrary objects are refused, not executed.
  torch.save({"module": torch.nn.Linear(2, 2)}, str(tmp_path / "bad.pth"))
  with pytest.raises(Exception, match="refusing"):
    torch_checkpoint.load_torch_file(str(tmp_path / "bad.pth"))


def test_missing_weights_fail_fast(tmp_path, monkeypatch):
  monkeypatch.delenv("JAXSD_FID_INCEPTION_WEIGHTS", raising=False)
  monkeypatch.delenv("JAXSD_OFFLINE", raising=False)
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
  start = time.time()
  with pytest.raises(hub.WeightsUnavailableError):
    inception.load_fid_inception(weights_path=str(tmp_path / "none.pth"))
  with pytest.raises(hub.WeightsUnavailableError):
    inception.load_fid_inception(cache_dir=str(tmp_path),
                                 allow_download=False)
  # With downloads allowed, this machine (offline) must give up quickly.
  monkeypatch.setattr(hub, "host_reachable",
                      lambda host, port=443, timeout=3.0: False)
  with pytest.raises(hub.WeightsUnavailableError, match="reachable"):
    inception.load_fid_inception(cache_dir=str(tmp_path))
  monkeypatch.setenv("JAXSD_OFFLINE", "1")
  with pytest.raises(hub.WeightsUnavailableError, match="offline"):
    inception.load_fid_inception(cache_dir=str(tmp_path))
  assert time.time() - start < 10
  assert os.listdir(tmp_path) == []  # no partial download left behind


def test_download_checks_hash_and_writes_atomically(tmp_path, monkeypatch):
  """hub.download against a local HTTP server (no internet needed)."""
  import functools
  import hashlib
  import http.server
  import threading

  monkeypatch.delenv("JAXSD_OFFLINE", raising=False)
  served = tmp_path / "served"
  served.mkdir()
  payload = os.urandom(3 << 20)
  (served / "w.pth").write_bytes(payload)
  digest = hashlib.sha256(payload).hexdigest()
  handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                              directory=str(served))
  handler.log_message = lambda *args: None
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    url = f"http://127.0.0.1:{server.server_port}/w.pth"
    out = tmp_path / "cache" / "w.pth"
    hub.download(url, str(out), sha256_prefix=digest[:8])
    assert out.read_bytes() == payload
    with pytest.raises(ValueError, match="sha256"):
      hub.download(url, str(tmp_path / "cache" / "bad.pth"),
                       sha256_prefix="0" * 8 if digest[0] != "0" else "1" * 8)
    assert sorted(os.listdir(tmp_path / "cache")) == ["w.pth"]
    with pytest.raises(hub.WeightsUnavailableError):
      hub.download(f"http://127.0.0.1:{server.server_port}/missing.pth",
                       str(tmp_path / "cache" / "missing.pth"))
  finally:
    server.shutdown()
    server.server_close()


# --- Weights known by their hash -------------------------------------------


def _sha256(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _standard_named(path, folder):
  """The random weights under pytorch-fid's file name, in `folder`."""
  folder.mkdir(exist_ok=True)
  os.symlink(path, folder / inception.FID_WEIGHTS_FILE)
  return str(folder / inception.FID_WEIGHTS_FILE)


def test_standard_file_name_with_another_hash_is_refused(
    random_inception, tmp_path, monkeypatch):
  """A file named pt_inception-2015-12-05-6726825d.pth whose sha256 does not
  start with 6726825d (here: random weights) is refused, found in the cache
  or given, in one line naming it."""
  _, path = random_inception
  monkeypatch.delenv("JAXSD_FID_INCEPTION_WEIGHTS", raising=False)
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
  standard = _standard_named(path, tmp_path / "cache")
  for kwargs in (dict(cache_dir=str(tmp_path / "cache"), allow_download=False),
                 dict(weights_path=standard)):
    with pytest.raises(inception.InceptionWeightsError) as info:
      inception.load_fid_inception(**kwargs)
    message = str(info.value)
    assert isinstance(info.value, errors.JaxsdError) and "\n" not in message
    assert message.startswith(f"{standard} is named as pytorch-fid's")
    assert f"starts with {_sha256(path)[:8]}, not 6726825d" in message


def test_the_standard_hash_loads_without_a_warning(random_inception, tmp_path,
                                                   monkeypatch, caplog):
  _, path = random_inception
  sha256 = _sha256(path)
  # These random weights play the published file.
  monkeypatch.setattr(inception, "FID_WEIGHTS_SHA256_PREFIX", sha256[:8])
  standard = _standard_named(path, tmp_path / "cache")
  with caplog.at_level(logging.WARNING):
    net = inception.load_fid_inception(weights_path=standard)
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
  assert net.identity == f"{inception.IDENTITY}-sha256-{sha256[:16]}"


def test_other_weights_are_used_with_a_warning_naming_them(random_inception,
                                                           caplog):
  _, path = random_inception
  with caplog.at_level(logging.WARNING):
    net = inception.load_fid_inception(weights_path=path)
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING]
  assert len(warnings) == 1
  assert warnings[0].startswith(f"FID Inception weights {path} (sha256 "
                                f"{_sha256(path)[:16]}...) are not "
                                "pytorch-fid's")
  assert net.identity.endswith(_sha256(path)[:16])


def test_reference_statistics_are_never_shared_between_weights(
    random_inception, tmp_path, monkeypatch):
  """fid_inception caches reference statistics per weights file: a second
  file computes its own, and the first's are reused only with the first."""
  import types  # pylint: disable=g-import-not-at-top
  from jaxsd.evaluation.metrics import fid_inception  # pylint: disable=g-import-not-at-top
  torch_model, path = random_inception
  state = torch_model.state_dict()
  state["Conv2d_1a_3x3.conv.weight"] = state["Conv2d_1a_3x3.conv.weight"] * 2
  other = str(tmp_path / "other_inception.pth")
  torch.save(state, other, _use_new_zipfile_serialization=False)

  # Features that depend on the weights, without running the network.
  def features(self, images, batch_size=50):
    del batch_size
    kernel = self.variables["params"]["Conv2d_1a_3x3"]["conv"]["kernel"]
    flat = np.asarray(images, np.float32).reshape(len(images), -1)[:, :8]
    return flat * float(np.abs(kernel).sum())
  monkeypatch.setattr(inception.InceptionFeatures, "__call__", features)
  computed = []

  def ctx_for(weights):
    def real_images(n, size):
      computed.append(weights)
      return np.random.RandomState(0).uniform(-1, 1, (n, size, size, 1))
    return types.SimpleNamespace(
        eval_config=types.SimpleNamespace(inception_weights=weights,
                                          inception_reference_samples=6),
        cache_dir=str(tmp_path / "cache"),
        config=types.SimpleNamespace(data=types.SimpleNamespace(image_size=8)),
        reference_name=lambda: "imagefolder-shapes-test",
        real_images=real_images)

  stats = {}
  for weights in (path, other, path):
    metric = fid_inception.InceptionFID()
    metric.prepare(ctx_for(weights))
    stats.setdefault(weights, []).append(metric.reference(ctx_for(weights), 8))
  assert computed == [path, other]  # the third start reused the first's
  np.testing.assert_array_equal(stats[path][0][0], stats[path][1][0])
  assert not np.allclose(stats[path][0][0], stats[other][0][0])
  files = sorted(f for f in os.listdir(tmp_path / "cache" / "fid_stats")
                 if f.endswith(".npz"))  # (not their preparation locks)
  assert len(files) == 2
  for weights in (path, other):
    assert sum(_sha256(weights)[:16] in f for f in files) == 1
