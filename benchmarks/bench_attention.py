"""Self-attention speed at a UNet's sizes: jaxsd's paths against PyTorch's SDPA.

Forward and forward+backward (gradients of q, k and v) of one attention
call, float32, batch 1, median milliseconds of --repeats calls after a
warm-up; jaxsd's blocked attention at the block sizes `flash_blocks`
chooses ("auto") and at the ones given, XLA's unblocked attention, and
PyTorch's `scaled_dot_product_attention` in the same process. The default
sizes are SD-1.5's self-attention at 64x64 and 32x32 latents:

  python benchmarks/bench_attention.py
  python benchmarks/bench_attention.py --sizes=4096x8x40 \
      --blocks=auto,32x4096,512x512,1024x512

Figures: benchmarks/README.md, "Attention block sizes".
"""
import os
import time

from absl import app
from absl import flags
import numpy as np

import jaxsd  # pylint: disable=unused-import  (jaxsd's XLA flags first)
import jax
import jax.numpy as jnp

from jaxsd.models import attention

_SIZES = flags.DEFINE_list(
    "sizes", ["4096x8x40", "1024x8x80"],
    "TOKENSxHEADSxHEAD_DIM, self-attention (keys = queries).")
_BLOCKS = flags.DEFINE_list(
    "blocks", ["auto", "xla"],
    "jaxsd paths: auto (flash_blocks' choice), xla (unblocked), or "
    "QUERIESxKEYS blocks of the blocked attention.")
_TORCH = flags.DEFINE_bool("pytorch", True, "Also time PyTorch's SDPA.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls (median).")


def _median_ms(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1000 * float(np.median(times))


def _jaxsd_fn(spec, tokens, heads):
  if spec == "auto":
    blocks = attention.flash_blocks(1, tokens, tokens, heads)
    return (lambda q, k, v: attention.flash_attention(q, k, v, blocks),
            f"blocked {blocks[1]}x{blocks[2]} (auto)")
  if spec == "xla":
    return (lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, implementation="xla"), "xla, unblocked")
  queries, keys = (int(x) for x in spec.split("x"))
  return (lambda q, k, v: attention.flash_attention(q, k, v,
                                                    (1, queries, keys)),
          f"blocked {queries}x{keys}")


def _time_jaxsd(fn, q, k, v, repeats):
  forward = jax.jit(fn)
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)**2),
                           argnums=(0, 1, 2)))
  return (_median_ms(lambda: jax.block_until_ready(forward(q, k, v)),
                     repeats),
          _median_ms(lambda: jax.block_until_ready(grads(q, k, v)), repeats))


def _time_torch(q, k, v, repeats):
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  q, k, v = (torch.from_numpy(np.asarray(t)).transpose(1, 2).contiguous()
             for t in (q, k, v))  # [B, N, T, H]
  sdpa = torch.nn.functional.scaled_dot_product_attention

  def forward():
    with torch.no_grad():
      sdpa(q, k, v)

  def backward():
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    (sdpa(qq, kk, vv)**2).sum().backward()
  return _median_ms(forward, repeats), _median_ms(backward, repeats)


def main(argv):
  del argv
  print(f"backend {jax.default_backend()}, {os.cpu_count()} CPU threads; "
        "ms per call, median of", _REPEATS.value)
  print("| tokens x heads x head size | path | forward | forward + backward |")
  print("| --- | --- | --- | --- |")
  for size in _SIZES.value:
    tokens, heads, head_dim = (int(x) for x in size.split("x"))
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, tokens, heads, head_dim)),
                           jnp.float32) for _ in range(3))
    rows = []
    for spec in _BLOCKS.value:
      if spec not in ("auto", "xla") and any(
          tokens % int(b) for b in spec.split("x")):
        continue  # blocks that do not divide this size
      fn, name = _jaxsd_fn(spec, tokens, heads)
      rows.append((f"jaxsd {name}", *_time_jaxsd(fn, q, k, v,
                                                  _REPEATS.value)))
    if _TORCH.value:
      rows.append(("PyTorch SDPA", *_time_torch(q, k, v, _REPEATS.value)))
    for name, forward, backward in rows:
      print(f"| {size} | {name} | {forward:.0f} | {backward:.0f} |",
            flush=True)


if __name__ == "__main__":
  app.run(main)
