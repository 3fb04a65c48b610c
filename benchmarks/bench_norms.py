"""The UNet's norms forward and backward at SD-1.5's and MNIST's shapes:
GroupNorm + SiLU (jaxsd's `unet.group_norm`, flax's `GroupNorm`,
PyTorch's) and LayerNorm (jaxsd's `unet.layer_norm`, flax's `LayerNorm`,
PyTorch's).

  python benchmarks/bench_norms.py [--repeats=10] [--skip_torch]

ms, median of `--repeats` jitted calls, float32, 32 groups: the forward
pass, and forward + input gradient (a frozen norm, as under LoRA). The
PyTorch side runs in a child process after JAX's.
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

# (batch, height = width, channels): SD-1.5's levels at 64x64 latents, then
# the MNIST UNet's widest.
SHAPES = ((1, 64, 320), (1, 64, 640), (1, 64, 960), (1, 32, 640),
          (1, 32, 1280), (1, 16, 1280), (1, 16, 2560), (1, 8, 1280),
          (1, 8, 2560), (32, 28, 64))
# LayerNorm (batch, tokens, channels): SD-1.5's transformer blocks, then
# the MNIST UNet's.
LN_SHAPES = ((1, 4096, 320), (1, 1024, 640), (1, 256, 1280), (1, 64, 1280),
             (32, 784, 64))
GROUPS, EPS = 32, 1e-5

flags.DEFINE_integer("repeats", 10, "Timed calls per figure (median).")
flags.DEFINE_bool("skip_torch", False, "JAX's figures only.")
flags.DEFINE_bool("torch_child", False, "Internal: PyTorch's side.")
FLAGS = flags.FLAGS


def jax_figures(repeats):
  import jaxsd  # pylint: disable=g-import-not-at-top,unused-import
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxsd.models import unet  # pylint: disable=g-import-not-at-top
  group_norms = {
      "jaxsd": lambda x, s, b: unet.group_norm(x, s, b, GROUPS, EPS),
      "flax": lambda x, s, b: nn.GroupNorm(GROUPS, epsilon=EPS).apply(
          {"params": {"scale": s, "bias": b}}, x),
  }
  layer_norms = {
      "jaxsd": lambda x, s, b: unet.layer_norm(x, s, b, EPS),
      "flax": lambda x, s, b: nn.LayerNorm(epsilon=EPS).apply(
          {"params": {"scale": s, "bias": b}}, x),
  }
  # (row key, row label, input shape, norms, activation after the norm)
  cases = ([("shape", (b, s, c), (b, s, s, c), group_norms, jax.nn.silu)
            for b, s, c in SHAPES]
           + [("layer_norm", shape, shape, layer_norms, lambda y: y)
              for shape in LN_SHAPES])
  rng = np.random.default_rng(0)
  rows = []
  for key, label, shape, norms, act in cases:
    x, g = (jax.device_put(rng.standard_normal(shape, dtype=np.float32))
            for _ in range(2))
    s, b = (jax.device_put(rng.standard_normal((shape[-1],),
                                               dtype=np.float32))
            for _ in range(2))
    row = {key: label}
    for name, norm in norms.items():
      fwd = jax.jit(lambda x, s, b, n=norm: act(n(x, s, b)))
      bwd = jax.jit(lambda x, s, b, g, n=norm: jax.vjp(
          lambda a: act(n(a, s, b)), x)[1](g)[0])
      row[f"{name}_fwd_ms"] = median_ms(lambda: fwd(x, s, b), repeats,
                                        jax.block_until_ready)
      row[f"{name}_fwd_dx_ms"] = median_ms(lambda: bwd(x, s, b, g), repeats,
                                           jax.block_until_ready)
    rows.append(row)
  return rows


def torch_figures(repeats):
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  out = []
  for batch, size, c in SHAPES:
    x = torch.randn(batch, c, size, size, requires_grad=True)
    g = torch.randn(batch, c, size, size)
    norm = torch.nn.GroupNorm(GROUPS, c, eps=EPS).requires_grad_(False)
    f = lambda: torch.nn.functional.silu(norm(x))
    with torch.no_grad():
      fwd = median_ms(f, repeats)
    both = median_ms(lambda: torch.autograd.grad(f(), x, g)[0], repeats)
    out.append((fwd, both))
  for shape in LN_SHAPES:
    x = torch.randn(*shape, requires_grad=True)
    g = torch.randn(*shape)
    norm = torch.nn.LayerNorm(shape[-1], eps=EPS).requires_grad_(False)
    with torch.no_grad():
      fwd = median_ms(lambda: norm(x), repeats)
    both = median_ms(lambda: torch.autograd.grad(norm(x), x, g)[0], repeats)
    out.append((fwd, both))
  return out


def main(argv):
  del argv
  if FLAGS.torch_child:
    print(json.dumps(torch_figures(FLAGS.repeats)))
    return
  rows = jax_figures(FLAGS.repeats)
  if not FLAGS.skip_torch:
    for row, (fwd, both) in zip(
        rows, torch_child_output(__file__, f"--repeats={FLAGS.repeats}")):
      row["pytorch_fwd_ms"], row["pytorch_fwd_dx_ms"] = fwd, both
  names = ["jaxsd", "flax"] + ([] if FLAGS.skip_torch else ["pytorch"])
  print("| norm, shape | "
        + " | ".join(f"{n} fwd / fwd+dx ms" for n in names) + " |")
  print("| --- |" + " --- |" * len(names))
  for r in rows:
    if "shape" in r:
      b, s, c = r["shape"]
      label = f"GroupNorm+SiLU {b} x {s}x{s} x {c}"
    else:
      label = "LayerNorm " + " x ".join(map(str, r["layer_norm"]))
    cells = [f"{r[n + '_fwd_ms']:.2f} / {r[n + '_fwd_dx_ms']:.2f}"
             for n in names]
    print(f"| {label} | " + " | ".join(cells) + " |")
  sd_groups = rows[:len(SHAPES) - 1]
  sd_layers = rows[len(SHAPES):-1]
  for title, part in (("GroupNorm", sd_groups), ("LayerNorm", sd_layers)):
    totals = {n: round(sum(r[n + "_fwd_dx_ms"] for r in part), 2)
              for n in names}
    print(f"{title} at SD shapes, fwd+dx summed:", json.dumps(totals))
  print(json.dumps(rows))
  print(json.dumps(cpu_info()))


if __name__ == "__main__":
  app.run(main)
