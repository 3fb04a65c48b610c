"""A 3x3 convolution's input gradient at SD-1.5's shapes: XLA's, the matmul
of `jaxsd.models.tied_gradient`, and PyTorch's.

  python benchmarks/bench_conv_gradients.py [--repeats=10] [--skip_torch]

For each (batch, size, in, out) of SD-1.5's UNet at 64x64 latents (and a
few batches around the switch), jitted, float32, ms, median of `--repeats`
calls:
- `xla`: the input gradient of `lax.conv_general_dilated` (XLA:CPU builds
  the kernel flipped and transposed, then convolves);
- `matmul`: `tied_gradient.conv_input_gradient_by_matmul` (one matmul over
  the kernel in place, then col2im), which jaxsd's convolutions use where
  output channels >= `MATMUL_INPUT_GRADIENT_RATIO` x output positions;
- `pytorch`: forward + input gradient minus forward of `nn.Conv2d` (frozen
  weights, as under LoRA), in a child process after JAX's side.
"""
import json
import os
import sys

from absl import app
from absl import flags

from bench_memory import cpu_info
from bench_memory import median_ms
from bench_memory import torch_child_output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (batch, height = width, in channels, out channels)
SHAPES = ((1, 64, 320, 320), (1, 64, 640, 320), (1, 32, 640, 640),
          (1, 32, 1280, 640), (1, 16, 1280, 1280), (1, 16, 2560, 1280),
          (2, 16, 1280, 1280), (1, 8, 1280, 1280), (1, 8, 2560, 1280),
          (8, 8, 1280, 1280))

flags.DEFINE_integer("repeats", 10, "Timed calls per figure (median).")
flags.DEFINE_bool("skip_torch", False, "JAX's figures only.")
flags.DEFINE_bool("torch_child", False, "Internal: PyTorch's side.")
FLAGS = flags.FLAGS


def jax_figures(repeats):
  import jaxsd  # pylint: disable=g-import-not-at-top,unused-import
  import jax  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxsd.models import tied_gradient  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  pads = ((1, 1), (1, 1))
  conv = lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  xla = jax.jit(lambda x, w, g: jax.vjp(lambda a: conv(a, w), x)[1](g)[0])
  matmul = jax.jit(lambda g, w: tied_gradient.conv_input_gradient_by_matmul(
      g, w, pads))
  rows = []
  for b, s, c_in, c_out in SHAPES:
    x = rng.standard_normal((b, s, s, c_in), dtype=np.float32)
    w = rng.standard_normal((3, 3, c_in, c_out), dtype=np.float32) * 0.01
    g = rng.standard_normal((b, s, s, c_out), dtype=np.float32)
    x, w, g = (jax.device_put(a) for a in (x, w, g))
    err = float(np.max(np.abs(xla(x, w, g) - matmul(g, w)))
                / np.max(np.abs(xla(x, w, g))))
    rows.append(dict(
        shape=(b, s, c_in, c_out),
        xla_ms=median_ms(lambda: xla(x, w, g), repeats,
                          jax.block_until_ready),
        matmul_ms=median_ms(lambda: matmul(g, w), repeats,
                             jax.block_until_ready),
        matmul_rel_err=err,
        jaxsd_uses_matmul=(c_out >= tied_gradient.MATMUL_INPUT_GRADIENT_RATIO
                           * b * s * s)))
  return rows


def torch_figures(repeats):
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  out = []
  for b, s, c_in, c_out in SHAPES:
    x = torch.randn(b, c_in, s, s, requires_grad=True)
    conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1).requires_grad_(False)
    g = torch.randn(b, c_out, s, s)
    with torch.no_grad():
      forward = median_ms(lambda: conv(x), repeats)
    both = median_ms(lambda: torch.autograd.grad(conv(x), x, g)[0], repeats)
    out.append(both - forward)
  return out


def main(argv):
  del argv
  if FLAGS.torch_child:
    print(json.dumps(torch_figures(FLAGS.repeats)))
    return
  rows = jax_figures(FLAGS.repeats)
  if not FLAGS.skip_torch:
    for row, ms in zip(
        rows, torch_child_output(__file__, f"--repeats={FLAGS.repeats}")):
      row["pytorch_ms"] = ms
  print("| batch x size x in -> out | XLA ms | matmul ms | PyTorch ms | "
        "jaxsd uses |")
  print("| --- | --- | --- | --- | --- |")
  for r in rows:
    b, s, c_in, c_out = r["shape"]
    torch_ms = f"{r['pytorch_ms']:.1f}" if "pytorch_ms" in r else "-"
    print(f"| {b} x {s}x{s} x {c_in} -> {c_out} | {r['xla_ms']:.1f} | "
          f"{r['matmul_ms']:.1f} | {torch_ms} | "
          f"{'matmul' if r['jaxsd_uses_matmul'] else 'XLA'} |")
  print(json.dumps(rows))
  print(json.dumps(cpu_info()))


if __name__ == "__main__":
  app.run(main)
