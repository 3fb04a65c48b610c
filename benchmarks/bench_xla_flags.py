"""XLA flags against compile time: small eager ops and a config's train step.

  python benchmarks/bench_xla_flags.py [--config=configs/tiny.py] \
      [--variants=",--xla_cpu_use_fusion_emitters=false"] [--repeats=3] \
      [--fast_compile=true]

Each variant is a set of extra XLA_FLAGS (`,` separates variants, spaces the
flags of one; the empty variant is XLA's defaults with jaxsd's own flags).
Every run is a fresh process with no compilation cache, the variants
alternating `repeats` times, so machine drift hits them alike. Per run:

  small_op_ms     a jnp op run outside jit (30 shapes x 4 ops: isfinite,
                  all, multiply, sum; each compiles once per shape, as in
                  tests that check arrays with jnp), milliseconds per op,
                  compile included.
  init_seconds    TrainSetup.create_train_state, compile included.
  step_compile_s  the train step's first call minus a steady step.
  step_seconds    a steady step (median of 3 windows of 2 steps).

`--fast_compile` sets jax_disable_most_optimizations, as the tests do
(tests/conftest.py). Prints one JSON object: per variant the medians and the
runs; `ratio` is each variant's medians over the first variant's.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from jaxsd import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = ("small_op_ms", "init_seconds", "step_compile_s", "step_seconds")

config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
flags.DEFINE_list("variants", ["", xla_flags.FAST_COMPILE_FLAG],
                  "Extra XLA_FLAGS per variant (the first is the baseline).")
flags.DEFINE_integer("repeats", 3, "Fresh-process runs per variant.")
flags.DEFINE_bool("fast_compile", True, "jax_disable_most_optimizations.")
flags.DEFINE_bool("child", False, "Internal: one measurement, JSON out.")
FLAGS = flags.FLAGS


def _small_ops() -> float:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  arrays = [jnp.ones((i + 1, 3), jnp.float32) for i in range(30)]
  start = time.perf_counter()
  for x in arrays:  # four jnp ops each, every one a new shape
    bool(jnp.all(jnp.isfinite(x)))
    float(jnp.sum(x * 2.0))
  return (time.perf_counter() - start) / (4 * len(arrays)) * 1e3


def _child(config) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_disable_most_optimizations", FLAGS.fast_compile)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import train_timing  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import setup as build  # pylint: disable=g-import-not-at-top
  jax.numpy.zeros(()).block_until_ready()  # the backend, outside the timings
  out = {"small_op_ms": _small_ops()}
  start = time.perf_counter()
  setup = build.TrainSetup(config)
  state = jax.block_until_ready(setup.create_train_state(jax.random.key(0)))
  out["init_seconds"] = time.perf_counter() - start
  step, key = setup.make_train_step(), jax.random.key(1)
  batch = train_timing.synthetic_batch(setup)
  start = time.perf_counter()
  state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  windows = []
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(2):
      state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    windows.append((time.perf_counter() - start) / 2)
  out["step_seconds"] = statistics.median(windows)
  out["step_compile_s"] = max(first - out["step_seconds"], 0.0)
  return out


def main(argv):
  del argv
  config = FLAGS.config
  if FLAGS.child:
    print("RESULT " + json.dumps(_child(config)))
    return
  runs = {v: [] for v in FLAGS.variants}
  overrides = [a for a in sys.argv[1:] if a.startswith("--config")]
  for _ in range(FLAGS.repeats):
    for variant in FLAGS.variants:
      env = {k: v for k, v in os.environ.items()
             if k not in ("JAX_COMPILATION_CACHE_DIR", "JAXSD_COMPILATION_CACHE")}
      env["XLA_FLAGS"] = " ".join(
          [env.get("XLA_FLAGS", "")] + variant.split()).strip()
      with tempfile.TemporaryDirectory() as tmp:
        env["JAXSD_CACHE"] = tmp  # nothing read back from an earlier run
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child",
             f"--fast_compile={FLAGS.fast_compile}", *overrides],
            cwd=ROOT, env=env, capture_output=True, text=True, check=False)
      lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
      if out.returncode or not lines:
        sys.exit(f"variant {variant!r} failed:\n{out.stderr[-3000:]}")
      runs[variant].append(json.loads(lines[-1][len("RESULT "):]))
  medians = {v: {f: statistics.median(r[f] for r in rs) for f in FIGURES}
             for v, rs in runs.items()}
  base = medians[FLAGS.variants[0]]
  print(json.dumps({
      "medians": medians,
      "ratio": {v: {f: m[f] / base[f] for f in FIGURES if base[f]}
                for v, m in medians.items()},
      "runs": runs,
      "fast_compile": FLAGS.fast_compile}, indent=1))


if __name__ == "__main__":
  app.run(main)
