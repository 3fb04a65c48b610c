"""Test set-up: offline assets, caches outside the repo, fast compiles."""
import os
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(os.path.dirname(ROOT), "shared", "assets")
sys.path.insert(0, ROOT)  # `configs` is imported as a package

os.environ.setdefault("JAXSD_MNIST_DIR", os.path.join(ASSETS, "mnist"))
os.environ.setdefault("JAXSD_CLIP_TOKENIZER",
                      os.path.join(ASSETS, "clip_tokenizer"))
_CACHE = os.environ.setdefault(
    "JAXSD_CACHE", os.path.join(tempfile.gettempdir(), "jaxsd-test-cache"))
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(_CACHE, "tfds"))
# Within a test run, a compiled step is reused from disk by later starts.
os.environ.setdefault("JAXSD_COMPILATION_CACHE", os.path.join(_CACHE, "xla"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end runs (a minute or more)")


@pytest.fixture(scope="session")
def tiny_config():
  """The tiny config, a fresh copy per call of the returned factory."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  return tiny.get_config


@pytest.fixture(scope="session")
def tokenizer():
  from jaxsd import text  # pylint: disable=g-import-not-at-top
  return text.load_tokenizer(os.environ["JAXSD_CLIP_TOKENIZER"])


@pytest.fixture(scope="session")
def trained_run(tiny_config, tmp_path_factory):
  """(workdir, final state) of an uninterrupted 4-step tiny run.

  The tiny config checkpoints at steps 2 and 4 and samples at step 4.
  """
  from jaxsd import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("trained_run"))
  state = train.train_and_evaluate(tiny_config(), workdir)
  return workdir, state
