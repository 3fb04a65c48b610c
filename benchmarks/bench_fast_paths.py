"""Each training fast path measured with and without it, on one config.

CPU (the figures are rough while other jobs share the machine):

  python benchmarks/bench_fast_paths.py --config=configs/mnist.py \
      [--paths=attention,donation,steps_per_call,prefetch,compile_cache,bf16] \
      [--repeats=3] [--steps=10] [--config.training.batch_size=...]

GPU: the same command on a machine with jax[cuda12]. There the attention path
compares two identical programs (the blocked attention is CPU-only) and bf16
is the path expected to pay off.

Paths ("with" / "without"):
  attention       jaxsd's CPU blocked attention / plain
                  jax.nn.dot_product_attention. Measured with cross-attention
                  blocks at every resolution (MNIST: 28x28, 14x14 and 7x7), as
                  the config's own attention is usually too short to block.
  donation        train step jitted with donate_argnums=(0,) / without;
                  step time and peak memory.
  steps_per_call  training.steps_per_call 4 / 1.
  prefetch        a host loop over the config's data (jaxsd.data's loader)
                  feeding the step, with data.workers=1 (a worker process
                  builds batches ahead) / 0 (a thread of this process).
  compile_cache   compile time with a warm persistent XLA cache / with an
                  empty one (jaxsd.training.trainer.enable_compilation_cache,
                  JAXSD_COMPILATION_CACHE), each in a fresh process.
  bf16            model.dtype bfloat16 / float32.

Every variant runs in its own subprocess (clean memory and compile figures),
except prefetch, whose two variants alternate in one process over the same
compiled step. Throughput figures are medians over `repeats` timed windows of
`steps` steps after a warm-up step; compile_cache runs `repeats` cold/warm
pairs. Prints one JSON object: per path the figures with and without it and
`ratio` (with / without, per figure; > 1 is faster for images_per_second,
< 1 is better for seconds and GB).
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags

import train_timing  # benchmarks/, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PATHS = ("attention", "donation", "steps_per_call", "prefetch",
         "compile_cache", "bf16")

config_flags.DEFINE_config_file("config", "configs/mnist.py", "Config file.")
flags.DEFINE_list("paths", list(PATHS), f"Fast paths to measure, of {PATHS}.")
flags.DEFINE_integer("repeats", 3, "Timed windows (or cold/warm compile "
                     "pairs) per variant; medians reported.")
flags.DEFINE_integer("steps", 10, "Train steps per timed window.")
flags.DEFINE_string("child", None, "Internal: measure PATH:VARIANT in this "
                    "process and print its figures.")
FLAGS = flags.FLAGS

# Figures compared between the variants (when both report them).
FIGURES = ("images_per_second", "seconds_per_step_median", "compile_seconds",
           "peak_memory_gb")
STEPS_PER_CALL = 4
_NO_BLOCKING = 2**62  # attention.CPU_MIN_SCORES that no attention reaches


# --- Children: one variant measured in this process -------------------------


def _attention_everywhere(config):
  """Cross-attention blocks at every resolution of the config's UNet."""
  n = len(config.model.block_out_channels)
  config.model.down_block_types = ("CrossAttnDownBlock2D",) * n
  config.model.up_block_types = ("CrossAttnUpBlock2D",) * n


def _attention_info(config):
  from jaxsd.models import attention  # pylint: disable=g-import-not-at-top
  n = len(config.model.block_out_channels)
  tokens = [(config.data.image_size // 2**i)**2 for i in range(n)]
  return {
      "overrides": {"model.down_block_types": config.model.down_block_types,
                    "model.up_block_types": config.model.up_block_types},
      "self_attention_tokens": tokens,
      "blocked_tokens": [t for t in tokens
                         if t * t >= attention.CPU_MIN_SCORES],
      "note": "measured with attention at every resolution (the overrides), "
              "not the config's own block types; blocking applies on CPU "
              "only (on GPU both variants are the same program)"}


def _measure_variant(config, path: str, variant: str):
  """train_timing.measure() with the path switched on ("with") or off."""
  on = variant == "with"
  donate, steps, info = True, FLAGS.steps, {}
  if path == "attention":
    _attention_everywhere(config)
    info = _attention_info(config)
    if not on:
      from jaxsd.models import attention  # pylint: disable=g-import-not-at-top
      attention.CPU_MIN_SCORES = _NO_BLOCKING
  elif path == "donation":
    donate = on
  elif path == "steps_per_call":
    config.training.steps_per_call = STEPS_PER_CALL if on else 1
    steps = -(-steps // STEPS_PER_CALL) * STEPS_PER_CALL  # same for both
  elif path == "bf16":
    config.model.dtype = "bfloat16" if on else "float32"
    info = {"note": "bfloat16 targets GPUs; on CPU it is expected slower"}
  elif path == "compile_cache":
    from jaxsd.training import session  # pylint: disable=g-import-not-at-top
    session.enable_compilation_cache()  # JAXSD_COMPILATION_CACHE, set by parent
  else:
    raise ValueError(f"unknown path {path!r}")
  windows = 1 if path == "compile_cache" else FLAGS.repeats
  result = train_timing.measure(config, windows, steps, donate=donate)
  if path == "compile_cache":
    cache_dir = os.environ["JAXSD_COMPILATION_CACHE"]
    result["cache_files"] = sum(len(f) for _, _, f in os.walk(cache_dir))
  return {**result, **info}


def _timed_loop(step, state, key, get_batch, position: int, calls: int,
                k: int):
  """Seconds for `calls` host-fed calls, as jaxsd.training.trainer's loop runs them.

  The window's first batch is built before the clock starts, so both
  variants time the same work: `calls` steps and `calls - 1` batches.
  """
  import jax  # pylint: disable=g-import-not-at-top
  batch = get_batch(position)
  start = time.perf_counter()
  for i in range(calls):
    state, metrics = step(state, batch, key)
    position += k
    if i < calls - 1:
      batch = get_batch(position)
  jax.block_until_ready(metrics)
  return time.perf_counter() - start, state, position


def _prefetch_child(config):
  """Both variants in one process, alternating windows: the real loader
  (jaxsd.data) feeding the step with data.workers=1 (batches built in a
  worker process, ahead of the step) or 0 (in this process's thread)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import setup as build  # pylint: disable=g-import-not-at-top
  from jaxsd.data import pipeline as data_pipeline  # pylint: disable=g-import-not-at-top
  setup = build.TrainSetup(config)
  state = setup.create_train_state(jax.random.key(0))
  step = setup.make_train_step()
  k = setup.steps_per_call
  source = data_pipeline.make_source(config)
  loaders = {}
  for variant, workers in (("with", 1), ("without", 0)):
    config.data.workers = workers
    loaders[variant] = data_pipeline.make_loader(
        config, setup.components.tokenizer, source)

  def getter(loader):
    def next_batch(position):  # as jaxsd.training.trainer's (the loader keeps count)
      del position
      return setup.global_batch(data_pipeline.next_model_batch(loader, k))
    return next_batch

  batch_seconds = []  # host cost of one batch, what a worker can hide
  for position in range(3):
    start = time.perf_counter()
    jax.block_until_ready(setup.global_batch(
        loaders["without"].batch_at(position)["image"]))
    batch_seconds.append(time.perf_counter() - start)
  key = jax.random.key(1)
  _, state, position = _timed_loop(step, state, key,
                                   getter(loaders["without"]), 0, 1, k)
  calls = max(1, FLAGS.steps // k)
  times = {"with": [], "without": []}
  for r in range(FLAGS.repeats):
    for variant in (("with", "without") if r % 2 == 0
                    else ("without", "with")):
      seconds, state, position = _timed_loop(
          step, state, key, getter(loaders[variant]), position, calls, k)
      times[variant].append(seconds / (calls * k))
  for loader in loaders.values():
    loader.close()
  out = {}
  for variant, ts in times.items():
    med = statistics.median(ts)
    out[variant] = {"images_per_second": config.training.batch_size / med,
                    "seconds_per_step_median": med,
                    "seconds_per_step_windows": ts}
  out["host_batch_seconds"] = statistics.median(batch_seconds)
  out["note"] = ("host loop over the config's data through jaxsd.data's "
                 "loader, data.workers 1 vs 0; both in one process, windows "
                 "alternating")
  return out


def child_main(config, spec: str):
  path, _, variant = spec.partition(":")
  if path == "prefetch":
    return _prefetch_child(config)
  return _measure_variant(config, path, variant)


# --- Parent: runs the children, compares -------------------------------------


_DEVICE = {}  # device and device_count, as the children report them


def _run_child(spec: str, env=None):
  config_path = config_flags.get_config_filename(FLAGS["config"])
  extra = [a for a in sys.argv[1:] if a.startswith("--config.")]
  cmd = [sys.executable, os.path.abspath(__file__), f"--config={config_path}",
         f"--child={spec}", f"--repeats={FLAGS.repeats}",
         f"--steps={FLAGS.steps}", *extra]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       check=False, env={**os.environ, **(env or {})})
  if out.returncode:
    raise RuntimeError(f"{spec} failed:\n{out.stderr[-3000:]}")
  result = json.loads(out.stdout.strip().splitlines()[-1])
  _DEVICE.update({k: result[k] for k in ("device", "device_count")
                  if k in result})
  return result


def _compare(with_, without, extra=None):
  """{"with": figures, "without": figures, "ratio": with / without}."""
  pick = lambda d: {k: d[k] for k in FIGURES if k in d}
  a, b = pick(with_), pick(without)
  ratio = {k: a[k] / b[k] for k in a if k in b and b[k]}
  return {"with": a, "without": b, "ratio": ratio, **(extra or {})}


def _measured_path(path: str):
  with_ = _run_child(f"{path}:with")
  without = _run_child(f"{path}:without")
  extra = {k: v for k, v in with_.items()
           if k in ("overrides", "self_attention_tokens", "blocked_tokens",
                    "note")}
  if path == "steps_per_call":
    extra["note"] = f"training.steps_per_call {STEPS_PER_CALL} vs 1"
  if path == "donation":
    extra["note"] = "donate_argnums=(0,) vs none"
  return _compare(with_, without, extra)


def _prefetch_path():
  out = _run_child("prefetch")
  return _compare(out["with"], out["without"],
                  {"host_batch_seconds": out["host_batch_seconds"],
                   "note": out["note"]})


def _compile_cache_path():
  cold, warm = [], []
  for _ in range(FLAGS.repeats):
    cache_dir = tempfile.mkdtemp(prefix="jaxsd-bench-xla-")
    try:
      env = {"JAXSD_COMPILATION_CACHE": cache_dir}
      cold.append(_run_child("compile_cache:cold", env))
      warm.append(_run_child("compile_cache:warm", env))
    finally:
      shutil.rmtree(cache_dir, ignore_errors=True)
  median = lambda runs: statistics.median(r["compile_seconds"] for r in runs)
  return {"cold_compile_seconds": median(cold),
          "warm_compile_seconds": median(warm),
          "ratio": {"compile_seconds": median(warm) / median(cold)},
          "cold_runs_compile_seconds": [r["compile_seconds"] for r in cold],
          "warm_runs_compile_seconds": [r["compile_seconds"] for r in warm],
          "cache_files": cold[-1]["cache_files"],
          "note": "each a fresh process; cold starts from an empty "
                  "JAXSD_COMPILATION_CACHE, warm reuses it; ratio = warm / "
                  "cold"}


def measure_path(path: str):
  if path == "prefetch":
    return _prefetch_path()
  if path == "compile_cache":
    return _compile_cache_path()
  return _measured_path(path)


def main(argv):
  del argv
  if FLAGS.child:
    print(json.dumps(child_main(FLAGS.config, FLAGS.child)))
    return
  unknown = sorted(set(FLAGS.paths) - set(PATHS))
  if unknown:
    raise app.UsageError(f"--paths: unknown {unknown}; choose from {PATHS}.")
  result = {"config": config_flags.get_config_filename(FLAGS["config"]),
            "overrides": [a for a in sys.argv[1:] if a.startswith("--config.")],
            "repeats": FLAGS.repeats, "steps": FLAGS.steps,
            "batch_size": FLAGS.config.training.batch_size, "paths": {}}
  failed = False
  for path in FLAGS.paths:
    start = time.perf_counter()
    try:
      result["paths"][path] = measure_path(path)
    except RuntimeError as e:  # keep the other paths' figures
      result["paths"][path] = {"error": str(e)[-2000:]}
      failed = True
    result["paths"][path]["wall_seconds"] = time.perf_counter() - start
  result.update(_DEVICE)
  print(json.dumps(result, indent=1, default=str))
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
