"""Test set-up: offline assets, caches outside the repo, fast compiles.

tests/unit/ holds the fast tests; tests/e2e/ the end-to-end ones, all
marked slow by tests/e2e/conftest.py. Shared helpers: tests/helpers.py.

Assets: a variable you set wins; else `../shared/assets/` beside the
repository when it exists; else, for the CLIP tokenizer, the copy in
tests/assets/. MNIST is not shipped: without JAXSD_MNIST_DIR, the shared
folder, a prepared tfds `mnist` or a network, the tests marked `mnist` skip.
"""
import glob
import os
import tempfile

import jax
import pytest

from jaxsd import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_ASSETS = os.path.join(os.path.dirname(ROOT), "shared", "assets")
REPO_ASSETS = os.path.join(ROOT, "tests", "assets")


def _shared(name):
  path = os.path.join(SHARED_ASSETS, name)
  return path if os.path.isdir(path) else None


if _shared("mnist"):
  os.environ.setdefault("JAXSD_MNIST_DIR", _shared("mnist"))
os.environ.setdefault(
    "JAXSD_CLIP_TOKENIZER",
    _shared("clip_tokenizer") or os.path.join(REPO_ASSETS, "clip_tokenizer"))
_CACHE = os.environ.setdefault(
    "JAXSD_CACHE", os.path.join(tempfile.gettempdir(), "jaxsd-test-cache"))
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(_CACHE, "tfds"))
# Within a test run, a compiled step is reused from disk by later starts.
os.environ.setdefault("JAXSD_COMPILATION_CACHE", os.path.join(_CACHE, "xla"))
# The same cache for every compile of the session and of the commands it
# starts (jaxsd itself turns it on for training only): a subprocess's
# sampler or evaluation compiled before is read back, not compiled again.
# JAX reads these at import, so the subprocesses take them from here.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.environ["JAXSD_COMPILATION_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
if os.environ["JAX_COMPILATION_CACHE_DIR"]:  # "" turns it off
  jax.config.update("jax_compilation_cache_dir",
                    os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update(
      "jax_persistent_cache_min_compile_time_secs",
      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Compile without most XLA optimisations (as Flax's example tests do): a
# compile several times faster, the same numbers up to float32 rounding.
# Set in the environment so that the commands and workers the tests start
# compile as this process does (their runs are compared with its runs).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
jax.config.update("jax_disable_most_optimizations",
                  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# XLA:CPU's older LLVM emitters (xla_flags.FAST_COMPILE_FLAG): the suite
# compiles thousands of small programs (every op a test runs outside jit
# compiles once per shape), and each compiles in about half the time. In
# the environment, so that the commands and workers the tests start compile
# as this process does. XLA reads XLA_FLAGS when JAX starts its backends,
# after this.
if xla_flags.jaxlib_knows_flags():
  os.environ["XLA_FLAGS"] = xla_flags.with_flag(
      os.environ.get("XLA_FLAGS", ""), xla_flags.FAST_COMPILE_FLAG)

MNIST_SKIPPED = "MNIST unavailable offline"
MNIST_HINT = "set JAXSD_MNIST_DIR to a folder of the four MNIST .gz files"


def _mnist_available() -> bool:
  if os.path.isdir(os.environ.get("JAXSD_MNIST_DIR", "")):
    return True
  prepared = os.path.join(os.environ["TFDS_DATA_DIR"], "mnist", "*",
                          "dataset_info.json")
  if glob.glob(prepared):
    return True
  from jaxsd import hub  # pylint: disable=g-import-not-at-top
  return hub.network_available("storage.googleapis.com")


# Fixtures that train a model: only tests in tests/e2e/ (all marked slow)
# may use them, so tests/unit and `-m "not slow"` stay the fast suite.
TRAINING_FIXTURES = ("trained_run", "autoencoder_run", "mnist_classifier")
E2E = os.path.join(ROOT, "tests", "e2e")


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything
def pytest_itemcollected(item):
  trains = [f for f in TRAINING_FIXTURES if f in item.fixturenames]
  if trains and not str(item.path).startswith(E2E + os.sep):
    raise pytest.UsageError(
        f"{item.nodeid} uses {trains[0]} (trains a model) but is not in "
        "tests/e2e/")


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(items):
  needs_mnist = [item for item in items if item.get_closest_marker("mnist")]
  if needs_mnist and not _mnist_available():
    skip = pytest.mark.skip(reason=f"{MNIST_SKIPPED}: {MNIST_HINT}")
    for item in needs_mnist:
      item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
  count = sum(MNIST_SKIPPED in str(report.longrepr)
              for report in terminalreporter.stats.get("skipped", []))
  if count:
    terminalreporter.write_line(
        f"{MNIST_SKIPPED}: {count} test{'s' * (count != 1)} skipped; "
        f"{MNIST_HINT}")


@pytest.fixture(scope="session")
def tiny_config():
  """The tiny config, resolved for this machine (jaxsd.environment), a
  fresh copy per call of the returned factory."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from jaxsd import environment  # pylint: disable=g-import-not-at-top

  def make():
    return environment.resolve(tiny.get_config())
  return make


@pytest.fixture(scope="session")
def tokenizer():
  from jaxsd.text import encoder as text  # pylint: disable=g-import-not-at-top
  return text.load_tokenizer(os.environ["JAXSD_CLIP_TOKENIZER"])


@pytest.fixture(scope="session")
def mnist_classifier(tiny_config):
  """The evaluator's MNIST classifier, from this session's cache
  ($JAXSD_CACHE/classifier), trained there on a miss (a fresh cache, as in
  CI) with XLA's optimisations on: its ~1900 steps run about 2.5x faster
  with them, more than their compile costs."""
  import helpers  # pylint: disable=g-import-not-at-top
  from jaxsd import environment  # pylint: disable=g-import-not-at-top
  from jaxsd.data import mnist  # pylint: disable=g-import-not-at-top
  from jaxsd.evaluation import classifier  # pylint: disable=g-import-not-at-top
  data = environment.resolve(tiny_config()).data
  arrays = lambda: (*mnist.load_mnist(data, "train"),
                    *mnist.load_mnist(data, "test"))
  with helpers.xla_optimised():
    return classifier.load_or_train_classifier(
        os.path.join(environment.cache_dir(), "classifier"), arrays)


def _run_once(tmp_path_factory, name, train):
  """`train(workdir)`'s picklable result, run once per test session.

  pytest-xdist gives each worker its own session, so a session fixture
  would train once per worker; here the first worker to ask trains under a
  file lock in the workers' common temporary folder, and the others wait
  for the lock and read what it saved (`train` must write only its workdir,
  and tests must not write into it)."""
  import fcntl  # pylint: disable=g-import-not-at-top
  import pickle  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # shared by the workers of this run
  workdir = os.path.join(str(base), name)
  result_path = workdir + ".pkl"
  with open(workdir + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(result_path):
      if os.path.exists(workdir):  # a worker died training it
        import shutil  # pylint: disable=g-import-not-at-top
        shutil.rmtree(workdir)
      result = train(workdir)
      with open(result_path + ".tmp", "wb") as f:
        pickle.dump(result, f)
      os.replace(result_path + ".tmp", result_path)
    with open(result_path, "rb") as f:
      return workdir, pickle.load(f)


@pytest.fixture(scope="session")
def trained_run(tiny_config, mnist_classifier, tmp_path_factory):
  """(workdir, final params) of an uninterrupted 4-step tiny run, trained
  once per test session (shared by the xdist workers: no test writes into
  it).

  The tiny config checkpoints at steps 2 and 4 and samples and evaluates
  (with mnist_classifier) at step 4. The second item has the final state's
  `step`, `params` and `ema_params` as host arrays.
  """
  del mnist_classifier  # trained (if it must be) before, optimised
  import types  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import task as diffusion_task  # pylint: disable=g-import-not-at-top

  def train(workdir):
    state = diffusion_task.train_and_evaluate(tiny_config(), workdir)
    return jax.device_get({"step": state.step, "params": state.params,
                           "ema_params": state.ema_params})
  workdir, final = _run_once(tmp_path_factory, "trained_run", train)
  return workdir, types.SimpleNamespace(**final)


@pytest.fixture(scope="session")
def autoencoder_config(tiny_config):
  """Factory of helpers.small_autoencoder's config with the discriminator
  from step 2 (a resume at step 2 crosses its switch-on)."""
  import helpers  # pylint: disable=g-import-not-at-top

  def make():
    config = helpers.small_autoencoder(tiny_config())
    config.autoencoder.disc_start = 2
    return config
  return make


@pytest.fixture(scope="session")
def autoencoder_run(autoencoder_config, tmp_path_factory):
  """(workdir, final params) of an uninterrupted 4-step autoencoder run on
  MNIST (checkpoints at 2 and 4), offline: no rFID. Trained once per test
  session, as trained_run; the second item has the final state's `step`
  and `params` as host arrays."""
  import types  # pylint: disable=g-import-not-at-top
  from jaxsd.autoencoder import task as autoencoder_task  # pylint: disable=g-import-not-at-top

  def train(workdir):
    with pytest.MonkeyPatch.context() as env:
      env.setenv("JAXSD_OFFLINE", "1")  # no download try for rFID
      state = autoencoder_task.train_autoencoder(autoencoder_config(),
                                                 workdir)
    return jax.device_get({"step": state.step, "params": state.params})
  workdir, final = _run_once(tmp_path_factory, "autoencoder_run", train)
  return workdir, types.SimpleNamespace(**final)


@pytest.fixture
def fresh_flags():
  """Removes the flags a command's run() defined, so the next can define
  its own. absl's own flags (its help flags) are defined first and kept."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  app.define_help_flags()
  before = set(flags.FLAGS)
  yield
  for name in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, name)
