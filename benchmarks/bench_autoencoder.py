"""Autoencoder encode+decode speed: jaxsd's AutoencoderKL vs diffusers'.

  python benchmarks/bench_autoencoder.py [--arch=sd|small] [--sizes=64,256]
      [--batch_64=4] [--batch_256=1] [--repeats=5]

Builds diffusers' PyTorch AutoencoderKL with random weights (--arch=sd:
Stable Diffusion 1.x's VAE, block_out_channels (128, 256, 512, 512), two
layers per block, 4 latent channels, 32-group norms; --arch=small: a
quick (32, 64, 128) one) and converts the same weights into jaxsd's
AutoencoderKL (`convert_diffusers_weights`). Then, at each image size, it
times one batch through encode (the posterior mean) and decode: jaxsd
jitted, PyTorch eager under torch.no_grad in eval mode, their calls
interleaved. PyTorch's 2 OpenMP threads slow down several times over when
another process takes a core, so run it on a quiet machine.

Prints one JSON object with the CPU (its model name, whether it has
AVX-512F, the cores), torch's thread count and, per size: the batch,
jaxsd's compile seconds, the median and minimum seconds per batch of each
(after a warm-up call), `torch_over_jaxsd` (PyTorch's median / jaxsd's:
> 1 means jaxsd is faster) and `max_abs_diff` of the two decoded batches
(with `max_abs_output` for scale).
"""
import json
import os
import platform
import statistics
import time

from absl import app
from absl import flags

# jaxsd before JAX: `import jaxsd` sets its XLA:CPU flags before a backend
# starts (jaxsd/xla_flags.py).
from jaxsd.models import autoencoder as ae
import jax
import jax.numpy as jnp
import numpy as np

ARCHS = {
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               latent_channels=4, norm_num_groups=32),
    "small": dict(block_out_channels=(32, 64, 128), layers_per_block=1,
                  latent_channels=4, norm_num_groups=8),
}

flags.DEFINE_enum("arch", "sd", list(ARCHS), "Autoencoder architecture.")
flags.DEFINE_list("sizes", ["64", "256"], "Image sizes (square, pixels).")
flags.DEFINE_integer("batch_64", 4, "Batch size at 64x64.")
flags.DEFINE_integer("batch_256", 1, "Batch size at 256x256.")
flags.DEFINE_integer("batch", 1, "Batch size at any other size.")
flags.DEFINE_integer("repeats", 5, "Timed batches per implementation "
                     "(median reported), after one warm-up.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and images.")
FLAGS = flags.FLAGS


def cpu_info():
  """The CPU's model name and AVX-512F support (first CPU in
  /proc/cpuinfo), and the core count."""
  fields = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
        if "model name" in fields and "flags" in fields:
          break
  except OSError:  # not Linux
    pass
  return {"model_name": fields.get("model name", platform.processor()),
          "avx512f": ("avx512f" in fields["flags"].split()
                      if "flags" in fields else None),
          "cores": os.cpu_count()}


def batch_size(size: int) -> int:
  return {64: FLAGS.batch_64, 256: FLAGS.batch_256}.get(size, FLAGS.batch)


def timed(fn):
  """(seconds, result) of one call."""
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top  (slow imports)
  from diffusers import AutoencoderKL as TorchAutoencoderKL  # pylint: disable=g-import-not-at-top
  from diffusers.utils import logging as diffusers_logging  # pylint: disable=g-import-not-at-top
  diffusers_logging.set_verbosity_error()

  config = ae.AutoencoderConfig(**ARCHS[FLAGS.arch])
  torch.manual_seed(FLAGS.seed)
  theirs = TorchAutoencoderKL.from_config(config.to_diffusers()).eval()
  params = ae.convert_diffusers_weights(
      {k: v.numpy() for k, v in theirs.state_dict().items()}, config)
  ours = ae.AutoencoderKL(config)

  @jax.jit
  def jaxsd_encode_decode(p, x):
    mean, _ = ours.apply({"params": p}, x, method=ours.encode)
    return ours.apply({"params": p}, mean, method=ours.decode)

  def torch_encode_decode(x):
    with torch.no_grad():
      mean = theirs.encode(x).latent_dist.mean
      return theirs.decode(mean).sample

  result = {
      "arch": FLAGS.arch, "config": ARCHS[FLAGS.arch],
      "cpu": cpu_info(), "torch_threads": torch.get_num_threads(),
      "backend": jax.default_backend(), "jax": jax.__version__,
      "torch": torch.__version__, "repeats": FLAGS.repeats,
  }
  rng = np.random.default_rng(FLAGS.seed)
  for size in map(int, FLAGS.sizes):
    b = batch_size(size)
    x = rng.uniform(-1, 1, (b, size, size, config.in_channels)).astype(
        np.float32)
    x_jax = jnp.asarray(x)
    x_torch = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    start = time.perf_counter()
    compiled = jaxsd_encode_decode.lower(params, x_jax).compile()
    compile_s = time.perf_counter() - start
    runs = {"jaxsd": lambda: jax.block_until_ready(compiled(params, x_jax)),
            "torch": lambda: torch_encode_decode(x_torch)}
    outputs = {name: run() for name, run in runs.items()}  # warm-up
    # Interleaved, so that load from other processes hits both alike.
    times = {name: [] for name in runs}
    for _ in range(FLAGS.repeats):
      for name, run in runs.items():
        times[name].append(timed(run)[0])
    ours_out, theirs_out = outputs["jaxsd"], outputs["torch"]

    theirs_np = theirs_out.numpy().transpose(0, 2, 3, 1)
    entry = {"batch": b, "image": [size, size, config.in_channels]}
    for name, seconds in times.items():
      entry[name] = {"s_per_batch_median": round(statistics.median(seconds),
                                                 4),
                     "s_per_batch_min": round(min(seconds), 4)}
    entry["jaxsd"]["compile_s"] = round(compile_s, 2)
    entry["torch_over_jaxsd"] = round(
        entry["torch"]["s_per_batch_median"] /
        entry["jaxsd"]["s_per_batch_median"], 3)
    entry["max_abs_diff"] = float(np.max(np.abs(np.asarray(ours_out) -
                                                theirs_np)))
    entry["max_abs_output"] = float(np.max(np.abs(theirs_np)))
    result[f"size_{size}"] = entry
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
