"""The larger shipped configs' real train steps trace (seconds each):
shapes, dtypes and shardings fit together (jax.eval_shape, no compile).
mnist and tiny: tests/unit/test_configs.py."""
import importlib

import pytest

from jaxsd.diffusion import setup as build

import helpers


@pytest.mark.parametrize("name", ["mnist_gpu", "mnist_reference",
                                  "imagefolder", "cifar10"])
def test_config_traces_its_train_step(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  helpers.assert_step_traces(build.TrainSetup(config))
