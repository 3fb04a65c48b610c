"""One-command GPU check: train-step time and peak device memory of an SD
1.5-sized UNet, and sampling throughput.

  python benchmarks/gpu_check.py [--size=sd|small] [--batches=1,4,8]
      [--steps=3] [--remat=none,blocks] [--time_budget_s=540]
      [--output=PATH]

At 64x64x4 latents with a [B, 77, 768] context, bf16 compute
(`--compute_dtype`), jaxsd's UNet in SD 1.5's layout (bench_memory.py's
`make_unet`; `--size=sd` 859.5M params, `small` 35.0M), it measures:

- `train/full/remat=<policy>`: forward + backward + AdamW on every param
  (float32 master weights and moments), for each `--remat` policy;
- `train/lora`: LoRA adapters (rank `--lora_rank`) on to_q/to_k/to_v/
  to_out_0 trained with AdamW, the base frozen in `--base_dtype`;

each at `--batches` in increasing order: compile seconds, XLA's
`memory_analysis()`, seconds per step (median of `--steps` after a
warm-up), images/s, and `peak_bytes_in_use` of `jax.devices()[0].
memory_stats()`. A batch whose compiled need (arguments + temp +
non-aliased outputs) exceeds the device's free memory is not run, nor are
the larger ones; an out-of-memory error ends that configuration the same
way.
- `sample`: images/s of `jaxsd.diffusion.samplers.sample` (DDIM,
  `--sample_steps` 50, classifier-free guidance 7.5, so two UNet batches a
  step) at `--sample_batch` 8, params in the compute dtype, jitted whole.

Each configuration runs in its own process, its batches in increasing
order, so the device's peak after a batch is that batch's (memory grows
with the batch). Configurations run cheapest first: sampling, LoRA, then
full fine-tuning. A configuration or batch that would start after
`--time_budget_s` is skipped and listed as such (it is sized to finish
under 10 minutes on one H200-class GPU; compiles dominate). The children
run with JAX's memory settings as given (by default JAX preallocates 75%
of the GPU, reported as `bytes_limit`); the parent allocates nothing.

Prints one JSON line per measurement as it finishes, then one JSON object
with everything and the device (`device_kind`, memory limit); `--output`
also writes that object to a file.

On a CPU (no GPU) the defaults shrink to a smoke run that proves the
script works: batch 1 at 16x16 latents, sampling batch 1 with 2 steps, no
time budget to speak of, unless those flags are given; e.g. `--size=small
--steps=1` (about 5 minutes on 2 cores, compiles nearly all of it).
"""
import json
import os
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import bench_memory  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_enum("size", "sd", list(bench_memory.SIZES), "UNet size.")
flags.DEFINE_list("batches", ["1", "4", "8"], "Train batch sizes (ascending).")
flags.DEFINE_integer("steps", 3, "Timed train steps after a warm-up.")
flags.DEFINE_list("remat", ["none", "blocks"], "UNet.remat policies for full "
                  "fine-tuning.")
flags.DEFINE_bool("lora", True, "Measure LoRA training too.")
flags.DEFINE_string("compute_dtype", "bfloat16", "UNet compute dtype.")
flags.DEFINE_string("base_dtype", "bfloat16", "LoRA's frozen base storage.")
flags.DEFINE_integer("lora_rank", 4, "LoRA rank (alpha = rank).")
flags.DEFINE_integer("resolution", 64, "Latent height and width.")
flags.DEFINE_integer("tokens", 77, "Text context length.")
flags.DEFINE_integer("sample_batch", 8, "Images per sampling call (0: skip).")
flags.DEFINE_integer("sample_steps", 50, "DDIM steps.")
flags.DEFINE_integer("sample_repeats", 2, "Timed sampling calls (median).")
flags.DEFINE_float("guidance_scale", 7.5, "Classifier-free guidance.")
flags.DEFINE_float("time_budget_s", 540, "Start nothing after this many "
                   "seconds.")
flags.DEFINE_string("output", "", "Also write the final JSON here.")
flags.DEFINE_string("child", "", "Internal: one configuration as JSON.")
FLAGS = flags.FLAGS

# CPU smoke-run defaults (flags given on the command line win).
CPU_DEFAULTS = dict(batches=["1"], resolution=16, sample_batch=1,
                    sample_steps=2, sample_repeats=1, time_budget_s=3600)


def _device_memory():
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.devices()[0].memory_stats() or {}
  return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use",
                                     "bytes_limit") if k in stats}


def _is_oom(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _emit(record):
  print(json.dumps(record), flush=True)


def _fits(xla, memory, margin=0.05):
  """(fits, need bytes, free bytes); fits when the device says nothing."""
  if not xla or "bytes_limit" not in memory:
    return True, None, None
  need = (xla["argument_bytes"] + xla["temp_bytes"] + xla["output_bytes"]
          - xla["alias_bytes"])
  free = memory["bytes_limit"] - memory.get("bytes_in_use", 0)
  return need * (1 + margin) <= free, need, free


def train_child(spec):
  """Every batch of one train configuration, ascending."""
  import jax  # pylint: disable=g-import-not-at-top
  model = bench_memory.make_unet(spec["size"], spec["compute_dtype"],
                                 spec["remat"])
  deadline = spec["deadline"]
  last_duration = 0.0
  for batch in spec["batches"]:
    record = dict(name=spec["name"], batch=batch, remat=spec["remat"],
                  mode=spec["mode"], compute_dtype=spec["compute_dtype"])
    if time.time() + 1.2 * last_duration > deadline:
      _emit(dict(record, skipped="time budget"))
      continue
    started = time.time()
    shapes = bench_memory.input_shapes(model, batch, spec["resolution"],
                                       spec["tokens"])
    train = bench_memory.TrainStep(model, shapes, spec["mode"],
                                   spec["base_dtype"], spec["lora_rank"])
    record.update(params=train.num_params, trained_params=train.num_trained)
    try:
      start = time.perf_counter()
      compiled = train.compile(shapes)
      record["compile_s"] = time.perf_counter() - start
      record["xla"] = xla = bench_memory.memory_analysis(compiled)
      fits, need, free = _fits(xla, _device_memory())
      if not fits:
        _emit(dict(record, skipped=f"needs {need / 1e9:.1f} GB, "
                   f"{free / 1e9:.1f} GB free", xla_need_bytes=need))
        return  # larger batches need more
      state = train.init_state(jax.random.key(0))
      data = bench_memory.random_batch(shapes)
      jax.block_until_ready((state, data))
      record["bytes_in_use_after_init"] = _device_memory().get("bytes_in_use")
      times = []
      for _ in range(1 + spec["steps"]):
        start = time.perf_counter()
        state, loss = compiled(state, data)
        loss = float(loss)
        times.append(time.perf_counter() - start)
      step_s = statistics.median(times[1:])
      record.update(step_s=step_s, warmup_step_s=times[0],
                    images_per_s=batch / step_s, loss=loss,
                    **{f"device_{k}": v for k, v in _device_memory().items()})
      del state, data, compiled
    except Exception as e:  # pylint: disable=broad-except
      if not _is_oom(e):
        raise
      _emit(dict(record, failed="out of memory: " + str(e)[:300]))
      return
    _emit(record)
    last_duration = time.time() - started


def sample_child(spec):
  """images/s of a jitted DDIM loop with guidance."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import samplers, schedules  # pylint: disable=g-import-not-at-top
  model = bench_memory.make_unet(spec["size"], spec["compute_dtype"])
  batch, res = spec["sample_batch"], spec["resolution"]
  shapes = bench_memory.input_shapes(model, batch, res, spec["tokens"])
  dtype = getattr(jnp, spec["compute_dtype"])
  params = jax.tree_util.tree_map(
      lambda p: p.astype(dtype),
      bench_memory.host_params(bench_memory.param_shapes(model, shapes)))
  schedule = schedules.make_schedule("scaled_linear", 1000)
  keys = jax.random.split(jax.random.key(1), 2)
  cond = jax.random.normal(keys[0], shapes["context"].shape)
  uncond = jax.random.normal(keys[1], (1,) + shapes["context"].shape[1:])

  @jax.jit
  def draw(params, rng, cond, uncond):
    denoise = lambda x, t, c: model.apply({"params": params}, x, t, c)
    return samplers.sample(
        denoise, schedule, rng, (batch, res, res, model.in_channels), cond,
        uncond, sampler="ddim", num_steps=spec["sample_steps"],
        guidance_scale=spec["guidance_scale"])

  record = dict(name="sample", batch=batch, steps=spec["sample_steps"],
                guidance_scale=spec["guidance_scale"],
                compute_dtype=spec["compute_dtype"],
                params=bench_memory.count(params))
  start = time.perf_counter()
  compiled = draw.lower(params, jax.random.key(2), cond, uncond).compile()
  record["compile_s"] = time.perf_counter() - start
  record["xla"] = bench_memory.memory_analysis(compiled)
  times = []
  for i in range(1 + spec["sample_repeats"]):
    start = time.perf_counter()
    images = compiled(params, jax.random.key(2 + i), cond, uncond)
    images.block_until_ready()
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times[1:])
  record.update(seconds_per_call=seconds, images_per_s=batch / seconds,
                unet_evaluations_per_s=2 * batch * spec["sample_steps"]
                / seconds, first_call_s=times[0],
                finite=bool(jnp.all(jnp.isfinite(images))),
                **{f"device_{k}": v for k, v in _device_memory().items()})
  _emit(record)


def _value(name):
  """A flag's value, or its CPU smoke default where JAX runs on a CPU and
  the flag was not given."""
  if (_BACKEND == "cpu" and name in CPU_DEFAULTS
      and not FLAGS[name].present):
    return CPU_DEFAULTS[name]
  return getattr(FLAGS, name)


_BACKEND = None


def _run_child(spec, env):
  cmd = [sys.executable, os.path.abspath(__file__),
         f"--child={json.dumps(spec)}"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       check=False, env=env)
  records = [json.loads(l) for l in out.stdout.splitlines()
             if l.startswith("{")]
  for r in records:
    _emit(r)
  if out.returncode:
    records.append(dict(name=spec["name"], failed=(
        f"exit status {out.returncode}: {out.stderr[-2000:]}")))
    _emit(records[-1])
  return records


def main(argv):
  del argv
  if FLAGS.child:
    import jaxsd  # pylint: disable=g-import-not-at-top,unused-import  # XLA flags first
    spec = json.loads(FLAGS.child)
    (sample_child if spec["name"] == "sample" else train_child)(spec)
    return
  child_env = dict(os.environ)  # JAX's memory settings as the user has them
  # This process only looks at the device: it must not take the GPU memory
  # JAX preallocates (75%) from the children that measure.
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  import jax  # pylint: disable=g-import-not-at-top
  global _BACKEND
  _BACKEND = jax.default_backend()
  start = time.time()
  deadline = start + _value("time_budget_s")
  device = jax.devices()[0]
  info = dict(device_kind=device.device_kind, backend=_BACKEND,
              device_count=jax.device_count(), jax=jax.__version__,
              size=FLAGS.size, resolution=_value("resolution"),
              tokens=FLAGS.tokens, compute_dtype=FLAGS.compute_dtype,
              memory=_device_memory())
  if _BACKEND == "cpu":
    info["cpu"] = bench_memory.cpu_info()
    info["note"] = "CPU smoke run: " + ", ".join(
        f"{k}={_value(k)}" for k in CPU_DEFAULTS)
  _emit(info)
  common = dict(size=FLAGS.size, compute_dtype=FLAGS.compute_dtype,
                resolution=_value("resolution"), tokens=FLAGS.tokens,
                lora_rank=FLAGS.lora_rank, steps=FLAGS.steps,
                batches=sorted(int(b) for b in _value("batches")),
                base_dtype=FLAGS.base_dtype)
  specs = []
  if _value("sample_batch") > 0:
    specs.append(dict(common, name="sample",
                      sample_batch=_value("sample_batch"),
                      sample_steps=_value("sample_steps"),
                      sample_repeats=_value("sample_repeats"),
                      guidance_scale=FLAGS.guidance_scale))
  if FLAGS.lora:
    specs.append(dict(common, name="train/lora", mode="lora", remat="none"))
  for remat in FLAGS.remat:
    specs.append(dict(common, name=f"train/full/remat={remat}", mode="full",
                      remat=remat, base_dtype="float32"))
  results = []
  for spec in specs:
    if time.time() > deadline:
      results.append(dict(name=spec["name"], skipped="time budget"))
      _emit(results[-1])
      continue
    results.extend(_run_child(dict(spec, deadline=deadline), child_env))
  summary = dict(info, results=results, wall_s=time.time() - start)
  print(json.dumps(summary), flush=True)
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump(summary, f, indent=1)


if __name__ == "__main__":
  app.run(main)
