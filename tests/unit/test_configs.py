"""Keeps the shipped configs honest without training them.

configs/mnist.py must be the recipe docs/mnist_results.md reports (the block
between the recipe markers), its model must build and its real train step
run; every config must validate and build; configs/default.py must stay
neutral about the data (MNIST's values live in configs/mnist.py).
"""
import ast
import functools
import importlib
import os
import re

import pytest

from configs import default
from configs import mnist
from jaxsd.diffusion import setup as build
from jaxsd.training import state as ts
from jaxsd import config_checks
from jaxsd.data import sources
from jaxsd.evaluation import metrics as metrics_lib

import helpers

ROOT = helpers.ROOT
RESULTS = os.path.join(ROOT, "docs", "mnist_results.md")
CONFIGS = ("mnist", "mnist_gpu", "mnist_reference", "tiny", "imagefolder",
           "cifar10", "emoji:pixel")


def _config(name):
  """configs/NAME.py's config; "NAME:ARG" passes the config string."""
  name, _, arg = name.partition(":")
  module = importlib.import_module(f"configs.{name}")
  return module.get_config(arg) if arg else module.get_config()


def documented_recipe():
  """{dotted key: value} from the recipe block of docs/mnist_results.md."""
  with open(RESULTS) as f:
    text = f.read()
  block = re.search(r"<!-- recipe:begin -->(.*?)<!-- recipe:end -->", text,
                    re.S)
  assert block, f"{RESULTS} has no recipe block"
  recipe = {}
  for line in block.group(1).splitlines():
    m = re.match(r"\s*([a-z_]+(?:\.[a-z_0-9]+)+)\s*=\s*(.+?)\s*(?:#.*)?$",
                 line)
    if m:
      recipe[m.group(1)] = ast.literal_eval(m.group(2))
  return recipe


def _lookup(config, dotted):
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def test_mnist_config_is_the_documented_recipe():
  recipe = documented_recipe()
  # The fields that decide the result must all be documented.
  for key in ("model.block_out_channels", "model.down_block_types",
              "model.pooled_text_embedding", "diffusion.prediction_type",
              "diffusion.schedule", "optim.learning_rate", "optim.ema_decay",
              "training.batch_size", "training.num_steps", "sampling.sampler",
              "sampling.num_steps", "sampling.guidance_scale"):
    assert key in recipe, f"{key} missing from the recipe block"
  config = _config("mnist")
  for key, value in recipe.items():
    actual = _lookup(config, key)
    if isinstance(actual, (tuple, list)):
      actual, value = tuple(actual), tuple(value)
    assert actual == value, f"configs/mnist.py {key}={actual!r}, docs {value!r}"


@functools.lru_cache(maxsize=None)
def _setup(name) -> build.TrainSetup:
  """The config's TrainSetup (state shapes and shardings, no compile),
  built once; tests only read it."""
  return build.TrainSetup(_config(name))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_and_builds(name):
  config_checks.validate(_config(name))
  assert ts.param_count(_setup(name).abstract_state.params["unet"]) > 10_000


def test_gpu_config_is_larger_than_cpu_config():
  count = lambda name: ts.param_count(_setup(name).abstract_state.params)
  assert count("mnist_gpu") > 5 * count("mnist")


@pytest.mark.parametrize("name", ["mnist", "tiny"])
def test_config_traces_its_train_step(name):
  """The config's real step (build.TrainSetup) traces: shapes, dtypes and
  shardings fit together (jax.eval_shape, no compile). The larger configs:
  tests/e2e/test_configs_trace.py."""
  state = helpers.assert_step_traces(_setup(name))
  if name == "mnist":
    # The pooled text path the recipe relies on is in the model.
    assert "text_embedding" in state.params["unet"]


def test_default_config_is_neutral_about_the_data():
  """default.py is the tree every experiment starts from: none of MNIST's
  captions, prompts, source or classifier metrics, which a config built on
  it would silently inherit; it validates, and asks for its data."""
  config, digits = default.get_config(), mnist.get_config()
  config_checks.validate(config)
  for key in ("data.source", "data.caption_template", "sampling.prompts"):
    assert _lookup(config, key) != _lookup(digits, key), key
  assert tuple(config.sampling.prompts) == ()  # the data's own captions
  data_bound = [name for name in config.eval.metrics
                if metrics_lib.get_metric(name).data_sources]
  assert not data_bound, f"default eval.metrics judge one dataset: {data_bound}"
  with pytest.raises(ValueError, match=r"needs data\.path"):
    sources.make_source(config.data)


def test_emoji_latent_recipe_validates_and_exports():
  """configs/emoji.py (latent) and :autoencoder validate; the latent recipe
  avoids what diffusers' StableDiffusionPipeline cannot load (the export's
  own refusal check passes), holds out 5% of the folder and composites
  transparency onto white; an unknown config string is refused."""
  import types  # pylint: disable=g-import-not-at-top
  from jaxsd.interop import sd_pipeline  # pylint: disable=g-import-not-at-top
  for kind in ("latent", "autoencoder"):
    config = _config(f"emoji:{kind}")
    config.data.path = "/emoji"
    config_checks.validate(config)
  assert config.data.holdout_fraction == 0.05
  assert config.data.background == "white"
  assert not config.data.random_flip  # flags are not mirror-symmetric
  latent = _config("emoji")
  assert latent.model.autoencoder and not latent.model.pooled_text_embedding
  sd_pipeline.check_exportable(latent, types.SimpleNamespace(autoencoder=1))
  with pytest.raises(ValueError, match="configs/emoji.py:autoencoder"):
    _config("emoji:nope")
