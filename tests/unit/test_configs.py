"""Keeps the shipped configs honest without training them.

configs/mnist.py must be the recipe docs/mnist_results.md reports (the block
between the recipe markers), its model must build and its real train step
run; every config must validate and build.
"""
import ast
import functools
import importlib
import os
import re

import jax
import numpy as np
import pytest

from jaxsd.diffusion import setup as build
from jaxsd import config_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "mnist_results.md")
CONFIGS = ("mnist", "mnist_gpu", "mnist_reference", "tiny", "imagefolder",
           "cifar10")


def _config(name):
  return importlib.import_module(f"configs.{name}").get_config()


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
  assert build.param_count(_setup(name).abstract_state.params["unet"]) > 10_000


def test_gpu_config_is_larger_than_cpu_config():
  count = lambda name: build.param_count(_setup(name).abstract_state.params)
  assert count("mnist_gpu") > 5 * count("mnist")


# Tracing the larger configs' steps takes seconds each.
@pytest.mark.parametrize("name", [
    "mnist", "tiny"] + [pytest.param(name, marks=pytest.mark.slow) for name in
                        ("mnist_gpu", "mnist_reference", "imagefolder",
                         "cifar10")])
def test_config_traces_its_train_step(name):
  """The config's real step (build.TrainSetup) traces: shapes, dtypes and
  shardings fit together (jax.eval_shape, no compile)."""
  setup = _setup(name)
  k, b = setup.steps_per_call, setup.config.training.batch_size
  lead = (k, b) if k > 1 else (b,)
  comps = setup.components
  batch = {"image": jax.ShapeDtypeStruct(lead + comps.image_shape,
                                         np.float32),
           "input_ids": jax.ShapeDtypeStruct(
               lead + comps.uncond_ids.shape[1:], np.int32)}
  state, metrics = jax.eval_shape(setup.step_fn(), setup.abstract_state,
                                  batch, jax.random.key(0))
  assert state.step.shape == () and metrics["loss"].shape == lead[:-1]
  shapes = lambda tree: jax.tree_util.tree_map(lambda x: x.shape, tree)
  assert shapes(state.params) == shapes(setup.abstract_state.params)
  if name == "mnist":
    # The pooled text path the recipe relies on is in the model.
    assert "text_embedding" in state.params["unet"]


