"""Train-step throughput of jaxsd's UNet vs diffusers' FlaxUNet2DConditionModel.

Times jit(value_and_grad(MSE of the UNet output)) at the MNIST architecture
and prints one JSON object with, per implementation, compile seconds, XLA
temp memory, median wall and process-CPU seconds per step and images/s, and
the speed ratios. Process CPU time is the steadier figure on a shared host.

  python benchmarks/bench_unet.py [--batch 64] [--runs 10] [--dtype float32]
"""
import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd.models import unet as unet_lib

# The MNIST UNet (configs/mnist.py), as a diffusers config.
MNIST_CONFIG = dict(
    sample_size=28, in_channels=1, out_channels=1,
    block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8, cross_attention_dim=64)


def random_params(shapes, seed=0):
  """Small random values for every leaf of an eval_shape'd param tree."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape), jnp.float32), shapes)


def compile_train_step(apply_fn, params, batch):
  """jit(value_and_grad(MSE)) compiled for `params`; and its compile seconds."""
  x, t, ctx = batch

  def loss_fn(p):
    return jnp.mean(jnp.square(apply_fn(p, x, t, ctx) - x))

  start = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(params).compile()
  return compiled, time.perf_counter() - start


def timed_call(compiled, params):
  """(wall seconds, process CPU seconds) of one step."""
  wall, cpu = time.perf_counter(), time.process_time()
  jax.block_until_ready(compiled(params))
  return time.perf_counter() - wall, time.process_time() - cpu


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--tokens", type=int, default=8)
  parser.add_argument("--runs", type=int, default=10)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--only", choices=("jaxsd", "diffusers"), default=None)
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)

  from diffusers import FlaxUNet2DConditionModel  # slow import
  from diffusers.utils import logging as diffusers_logging
  diffusers_logging.set_verbosity_error()

  cfg = MNIST_CONFIG
  b, s = args.batch, cfg["sample_size"]
  key = jax.random.key(0)
  x = jax.random.normal(key, (b, s, s, cfg["in_channels"]))
  t = jax.random.randint(jax.random.fold_in(key, 1), (b,), 0, 1000)
  ctx = jax.random.normal(jax.random.fold_in(key, 2),
                          (b, args.tokens, cfg["cross_attention_dim"]))

  theirs = FlaxUNet2DConditionModel(dtype=dtype, **cfg)
  shapes = jax.eval_shape(
      lambda: theirs.init(key, jnp.zeros((1, cfg["in_channels"], s, s)),
                          jnp.zeros((1,), jnp.int32), ctx[:1]))["params"]
  their_params = random_params(shapes)
  ours = unet_lib.unet_from_diffusers_config(theirs.config, dtype=dtype)
  our_params = unet_lib.convert_diffusers_params(their_params)

  def apply_theirs(p, x, t, ctx):
    out = theirs.apply({"params": p}, jnp.transpose(x, (0, 3, 1, 2)), t, ctx)
    return jnp.transpose(out.sample, (0, 2, 3, 1)).astype(jnp.float32)

  def apply_ours(p, x, t, ctx):
    return ours.apply({"params": p}, x, t, ctx)

  result = dict(batch=b, image=[s, s, cfg["in_channels"]],
                tokens=args.tokens, dtype=args.dtype,
                backend=jax.default_backend(),
                cpu_count=os.cpu_count(), runs=args.runs)
  impls = {"jaxsd": (apply_ours, our_params),
           "diffusers": (apply_theirs, their_params)}
  impls = {k: v for k, v in impls.items() if args.only in (None, k)}
  compiled = {}
  for name, (fn, params) in impls.items():
    compiled[name], compile_s = compile_train_step(fn, params, (x, t, ctx))
    result[name] = dict(
        compile_s=round(compile_s, 2),
        temp_gb=round(compiled[name].memory_analysis().temp_size_in_bytes /
                      1e9, 2))
    for _ in range(2):  # warm-up
      timed_call(compiled[name], params)
  # Interleaved, so that load from other processes hits both alike.
  times = {name: [] for name in impls}
  for _ in range(args.runs):
    for name, (_, params) in impls.items():
      times[name].append(timed_call(compiled[name], params))
  for name, runs in times.items():
    wall = statistics.median(w for w, _ in runs)
    result[name].update(
        step_s_median=round(wall, 3),
        step_s_min=round(min(w for w, _ in runs), 3),
        cpu_s_median=round(statistics.median(c for _, c in runs), 3),
        images_per_s=round(b / wall, 1))
  if "jaxsd" in result and "diffusers" in result:
    ratio = lambda k: round(result["diffusers"][k] / result["jaxsd"][k], 2)
    result["speedup_wall"] = ratio("step_s_median")
    result["speedup_cpu"] = ratio("cpu_s_median")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
