"""XLA flags jaxsd sets before JAX starts its backends.

`import jaxsd` applies `use_fast_cpu_kernels()`. The flags only act on the
CPU backend; GPU and TPU programs are unchanged. Opt out with
JAXSD_XLA_DEFAULTS=1, or by setting the flag yourself in XLA_FLAGS (the
user's value always wins).

Kept free of JAX imports: importing jaxsd must not start a backend before the
flags are in place.
"""
import os
import sys

from absl import logging

# XLA:CPU in jaxlib 0.10 lowers convolutions to YNNPACK by default. Its older
# Eigen convolutions run the MNIST UNet's 3x3 convolutions faster, forward
# and both gradients (figures: benchmarks/README.md, "XLA:CPU
# convolutions"). YNNPACK keeps the matmuls, where it is the faster one.
YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
FAST_CPU_FLAGS = (f"{YNN_FUSION_FLAG}=-individual_convolution",)
OPT_OUT_ENV = "JAXSD_XLA_DEFAULTS"
# XLA:CPU's older LLVM emitters instead of its MLIR fusion emitters: every
# program compiles faster (a small one in about half the time), a train step
# runs 6-21% slower (benchmarks/README.md, "The suite's small compiles").
# jaxsd's runs keep XLA's default; the tests set it (tests/conftest.py).
FAST_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"


def with_flag(xla_flags: str, flag: str) -> str:
  """xla_flags plus `--name=value`, unless they already set that name."""
  name = flag.split("=", 1)[0]
  if name in xla_flags:
    return xla_flags
  return f"{xla_flags} {flag}".strip()


def without_flag(xla_flags: str, flag: str) -> str:
  """xla_flags less any `--name` or `--name=value` of flag's name."""
  name = flag.split("=", 1)[0]
  return " ".join(f for f in xla_flags.split() if f.split("=", 1)[0] != name)


def backends_started() -> bool:
  """Whether JAX has created its backends (XLA_FLAGS are read then, once)."""
  if "jax" not in sys.modules:
    return False
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return xla_bridge.backends_are_initialized()


def jaxlib_knows_flags() -> bool:
  """Whether this jaxlib knows the XLA:CPU flags jaxsd and its tests set
  (XLA aborts on a flag it does not know; YNNPACK fusions came with 0.10)."""
  try:
    from jaxlib import version  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return tuple(int(p) for p in version.__version__.split(".")[:2]) >= (0, 10)


def use_fast_cpu_kernels() -> bool:
  """Adds FAST_CPU_FLAGS to XLA_FLAGS; True if XLA_FLAGS now carry them."""
  if os.environ.get(OPT_OUT_ENV) == "1" or not jaxlib_knows_flags():
    return False
  flags = os.environ.get("XLA_FLAGS", "")
  for flag in FAST_CPU_FLAGS:
    flags = with_flag(flags, flag)
  if flags == os.environ.get("XLA_FLAGS", ""):
    return all(f in flags for f in FAST_CPU_FLAGS)
  if backends_started():
    # Too late for this process: JAX read XLA_FLAGS when it started.
    import jax  # pylint: disable=g-import-not-at-top
    if jax.default_backend() == "cpu":
      logging.warning(
          "JAX started before `import jaxsd`, so XLA:CPU keeps its default "
          "(slower) convolutions. Import jaxsd before using JAX, or set "
          "XLA_FLAGS=%s yourself.", " ".join(FAST_CPU_FLAGS))
    return False
  os.environ["XLA_FLAGS"] = flags
  return True
