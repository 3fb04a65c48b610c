"""Every environment variable jaxsd reads, and the one place configs meet them.

Config files read no environment: a field left "" means "this machine's
default", and `resolve(config)` fills it in when a run starts (training) or a
saved run is reopened (sampling, evaluation). The resolved values are what
`config.json` records, so a saved config is the run's real config; reopened
on another machine, paths that do not exist there are resolved again here.

| variable | what |
| --- | --- |
| JAXSD_MNIST_DIR | folder of the four original MNIST files (data.mnist_dir) |
| TFDS_DATA_DIR | tensorflow-datasets' prepared data (data.tfds_data_dir) |
| JAXSD_CLIP_TOKENIZER | CLIP tokenizer folder or hub id (text.tokenizer) |
| JAXSD_CACHE | classifier and reference statistics (eval.cache_dir); the empty MLflow store new runs copy |
| JAXSD_COMPILATION_CACHE | persistent XLA compilation cache ("" disables) |
| JAXSD_FID_INCEPTION_WEIGHTS | pt_inception-2015-12-05-6726825d.pth |
| JAXSD_OFFLINE | 1: never try a download |
| JAXSD_XLA_DEFAULTS | 1: leave XLA_FLAGS as they are (jaxsd.xla_flags) |
| MLFLOW_TRACKING_URI | MLflow store (default: WORKDIR/mlflow.db) |
| JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID | a multi-process run without SLURM (jaxsd.parallel) |
| SLURM_* | set by srun; read by jax.distributed |

Libraries read their own too (HF_HUB_OFFLINE, HF_ENDPOINT, TORCH_HOME,
XLA_FLAGS).
"""
import os

MNIST_DIR = "JAXSD_MNIST_DIR"
TFDS_DATA_DIR = "TFDS_DATA_DIR"
CLIP_TOKENIZER = "JAXSD_CLIP_TOKENIZER"
CACHE = "JAXSD_CACHE"
COMPILATION_CACHE = "JAXSD_COMPILATION_CACHE"

DEFAULT_TOKENIZER = "openai/clip-vit-large-patch14"


def get(name: str, default: str = "") -> str:
  return os.environ.get(name, default)


def cache_dir() -> str:
  """jaxsd's cache: $JAXSD_CACHE, else ~/.cache/jaxsd."""
  return get(CACHE) or os.path.expanduser("~/.cache/jaxsd")


def compilation_cache_dir() -> str:
  """$JAXSD_COMPILATION_CACHE (set to "" to disable), else the cache's xla/."""
  return os.environ.get(COMPILATION_CACHE,
                        os.path.join(cache_dir(), "xla"))


def _missing_here(path: str) -> bool:
  # A hub id ("openai/clip-...") is not a path; only absolute paths can be
  # checked against this machine.
  return os.path.isabs(path) and not os.path.exists(path)


def resolve(config, reopened: bool = False):
  """Fills the config's machine-dependent fields in place; returns it.

  "" fields take the environment's value (or jaxsd's default). With
  `reopened` (a saved run's config.json, maybe from another machine), an
  absolute path that does not exist here also takes this machine's value,
  where it has one. Idempotent.
  """
  # Existing fields only: a locked config (config_flags) accepts this.
  def fill(section, key, variable, default="", default_elsewhere=True):
    value = section[key]
    here = get(variable) or (default if default_elsewhere else "")
    if not value or (reopened and _missing_here(value) and here):
      section[key] = get(variable) or default
  fill(config.data, "mnist_dir", MNIST_DIR)
  fill(config.data, "tfds_data_dir", TFDS_DATA_DIR,
       os.path.expanduser("~/tensorflow_datasets"))
  # A run's own tokenizer folder is only swapped for one the user names.
  fill(config.text, "tokenizer", CLIP_TOKENIZER, DEFAULT_TOKENIZER,
       default_elsewhere=False)
  fill(config.eval, "cache_dir", CACHE, cache_dir())
  return config
