"""Softmax attention for the UNet: XLA's, cuDNN's, and a blocked JAX one.

Every function takes queries [B, T, N, H] and keys, values [B, S, N, H]
(batch, tokens, heads, head size) and returns [B, T, N, H] in the queries'
dtype; softmax statistics are float32.

`dot_product_attention` chooses, from the backend and the sizes:

* GPU: `jax.nn.dot_product_attention(implementation="cudnn")` (fused, never
  stores the scores) where cuDNN takes the call (bf16/f16, supported head
  sizes); else the blocked attention below for long sequences, XLA's for
  short ones.
* CPU: the blocked attention from about 96x96 scores up, XLA's below.

`flash_attention` is the blocked attention (FlashAttention-2's algorithm,
in JAX): queries go through in blocks, one block's scores at a time; keys
too when a block of whole rows would not fit (`key_block`), with an online
softmax (running max and sum). Its backward pass recomputes each block's
scores from the saved output and log-sum-exp, so what is kept for the
backward pass and what is live at any time grow with T + S, not T * S.
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp

# A block of scores of a few MiB stays in cache on CPU, which pays from
# about 96x96 scores up (benchmarks/README.md, "Attention on CPU"); on GPUs
# the blocked path is only the fallback for long sequences cuDNN declines.
BLOCK_BYTES = 4 * 2**20
# Rows longer than ROW_KEYS keys go in key blocks of up to 512 keys against
# up to 512 queries (8 MiB of scores at 8 heads): at SD's 64x64 latents
# (4096 tokens, 8 heads of 40) forward and backward took 1.7 s on 2 AVX2
# cores against 2.5 s in whole-row blocks of 32 queries, and 1.2-1.35 s
# since their backward works on transposed scores; at 1024 tokens whole
# rows stay as fast (benchmarks/README.md, "Attention block sizes" and
# "Key blocks' backward on transposed scores"). 256 x 512 blocks time the
# same as 512 x 512 since.
ROW_KEYS = 1024
QUERY_BLOCK = KEY_BLOCK = 512
KEY_BLOCKED_BYTES = 8 * 2**20
CPU_MIN_SCORES = 96 * 96
GPU_MIN_SCORES = 1024 * 1024


def _largest_divisor_at_most(n: int, limit: int) -> int:
  return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


# The blocked path works on [B, N, T, H] ("heads-major") operands so every
# einsum is a plain batched matmul: XLA transposes only the small [T, H]
# operands, never a block of scores.


def _scores(q, k):
  return jnp.einsum("bnth,bnsh->bnts", q, k,
                    preferred_element_type=jnp.float32)


def _forward_block(q, k, v, key_block):
  """One query block: q [b, N, tq, H] (pre-scaled), k, v [b, N, S, H] ->
  (unnormalised output sum float32 [b, N, tq, H], row max, row sum)."""
  num_keys = k.shape[2]
  if key_block >= num_keys:  # whole rows: no rescaling needed
    logits = _scores(q, k)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    probs = jnp.exp(logits - row_max)
    acc = jnp.einsum("bnts,bnsh->bnth", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return acc, row_max, jnp.sum(probs, axis=-1, keepdims=True)

  def step(carry, kv):
    acc, row_max, row_sum = carry
    k_blk, v_blk = kv
    logits = _scores(q, k_blk)
    new_max = jnp.maximum(row_max, jnp.max(logits, axis=-1, keepdims=True))
    rescale = jnp.exp(row_max - new_max)
    probs = jnp.exp(logits - new_max)
    acc = acc * rescale + jnp.einsum("bnts,bnsh->bnth", probs.astype(v.dtype),
                                     v_blk, preferred_element_type=jnp.float32)
    row_sum = row_sum * rescale + jnp.sum(probs, axis=-1, keepdims=True)
    return (acc, new_max, row_sum), None

  b, n, tq, h = q.shape
  init = (jnp.zeros((b, n, tq, h), jnp.float32),
          jnp.full((b, n, tq, 1), -jnp.inf, jnp.float32),
          jnp.zeros((b, n, tq, 1), jnp.float32))
  (acc, row_max, row_sum), _ = jax.lax.scan(
      step, init, (_split(k, 2, key_block), _split(v, 2, key_block)))
  return acc, row_max, row_sum


def _split(x, axis: int, block: int):
  """x with `axis` cut into blocks of `block`, the block index first."""
  shape = x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:]
  return jnp.moveaxis(x.reshape(shape), axis, 0)


def _merge(x, axis: int):
  """Inverse of `_split`."""
  x = jnp.moveaxis(x, 0, axis)
  return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])


def _flash_forward(q, k, v, blocks):
  """Heads-major q [B, N, T, H] (pre-scaled), k, v [B, N, S, H] ->
  (output [B, N, T, H] in v's dtype, log-sum-exp float32 [B, N, T, 1])."""
  samples, queries, key_block = blocks

  def per_samples(qkv):
    q_s, k_s, v_s = qkv

    def per_queries(q_blk):
      acc, row_max, row_sum = _forward_block(q_blk, k_s, v_s, key_block)
      # Normalising the [.., tq, H] output rather than the [.., tq, S]
      # probabilities saves a pass over the scores.
      return (acc / row_sum).astype(v.dtype), row_max + jnp.log(row_sum)

    out, lse = jax.lax.map(per_queries, _split(q_s, 2, queries))
    return _merge(out, 2), _merge(lse, 2)

  out, lse = jax.lax.map(per_samples, (_split(q, 0, samples),
                                       _split(k, 0, samples),
                                       _split(v, 0, samples)))
  return _merge(out, 0), _merge(lse, 0)


def _backward_block(q, k, v, d_out, lse, delta):
  """Gradients of one block of whole rows from recomputed probabilities:
  (d_q (of pre-scaled q) [b, N, tq, H], d_k and d_v transposed [b, N, H,
  S]), float32.

  d_k and d_v contract the scores over their rows (queries). As
  [H, tq] x [tq, S] products XLA:CPU reads the scores in their own
  layout: whole rows of 1024 keys (8 heads of 80) took 130 ms forward and
  backward against 163 as [S, tq] x [tq, H] (benchmarks/README.md,
  "Attention backward" under "Kernels cast inside the op").
  """
  probs = jnp.exp(_scores(q, k) - lse)
  d_probs = jnp.einsum("bnth,bnsh->bnts", d_out, v,
                       preferred_element_type=jnp.float32)
  d_logits = (probs * (d_probs - delta)).astype(q.dtype)
  d_q = jnp.einsum("bnts,bnsh->bnth", d_logits, k,
                   preferred_element_type=jnp.float32)
  product = lambda a, p: jnp.einsum("bnth,bnts->bnhs", a, p,
                                    preferred_element_type=jnp.float32)
  return d_q, product(q, d_logits), product(d_out, probs.astype(d_out.dtype))


def _backward_keys_major(q, k, v, d_out, lse, delta):
  """Gradients of one (query block, key block) pair, computed on the
  transposed scores [b, N, tk, tq]: (d_q transposed [b, N, H, tq] (of
  pre-scaled q), d_k, d_v [b, N, tk, H]), float32.

  Every product reads its operands in their own layout: d_k and d_v
  contract over the queries, the transposed scores' minor axis, and d_q is
  built transposed. On the untransposed scores d_k and d_v read the
  scores across (a [tk, tq] x [tq, H] product over a [tq, tk] block), at
  about half the speed of the other products on XLA:CPU; this form made
  the forward and backward at 2304-4096 tokens 17-27% faster (benchmarks/
  README.md, "Key blocks' backward on transposed scores"). Whole rows keep
  `_backward_block`: there this form was slower at 784 tokens."""
  probs_t = jnp.exp(_scores(k, q) - jnp.swapaxes(lse, 2, 3))
  d_probs_t = jnp.einsum("bnsh,bnth->bnst", v, d_out,
                         preferred_element_type=jnp.float32)
  d_logits_t = (probs_t * (d_probs_t - jnp.swapaxes(delta, 2, 3))
                ).astype(q.dtype)
  d_q_t = jnp.einsum("bnsh,bnst->bnht", k, d_logits_t,
                     preferred_element_type=jnp.float32)
  d_k = jnp.einsum("bnst,bnth->bnsh", d_logits_t, q,
                   preferred_element_type=jnp.float32)
  d_v = jnp.einsum("bnst,bnth->bnsh", probs_t.astype(d_out.dtype), d_out,
                   preferred_element_type=jnp.float32)
  return d_q_t, d_k, d_v


def _flash_backward(q, k, v, out, lse, d_out, blocks):
  """(d_q of the pre-scaled q, d_k, d_v), float32, one block at a time."""
  samples, queries, key_block = blocks
  whole_rows = key_block >= k.shape[2]
  # sum_s P dP == sum_h dO O: a [.., T, H] product instead of another pass
  # over the scores (FlashAttention-2's D term).
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32),
                  axis=-1, keepdims=True)

  def per_samples(args):
    q_s, k_s, v_s, d_out_s, lse_s, delta_s = args

    def per_queries(carry, qblk):
      d_k, d_v = carry
      q_b, d_out_b, lse_b, delta_b = qblk
      if whole_rows:
        d_q, d_k_b, d_v_b = _backward_block(q_b, k_s, v_s, d_out_b, lse_b,
                                            delta_b)
        return (d_k + d_k_b, d_v + d_v_b), d_q

      def per_keys(d_q_t, kv):
        d_q_b, d_k_b, d_v_b = _backward_keys_major(q_b, *kv, d_out_b, lse_b,
                                                   delta_b)
        return d_q_t + d_q_b, (d_k_b, d_v_b)

      b, n, tq, h = q_b.shape
      d_q_t, (d_k_b, d_v_b) = jax.lax.scan(
          per_keys, jnp.zeros((b, n, h, tq), jnp.float32),
          (_split(k_s, 2, key_block), _split(v_s, 2, key_block)))
      return ((d_k + _merge(d_k_b, 2), d_v + _merge(d_v_b, 2)),
              jnp.swapaxes(d_q_t, 2, 3))

    zeros = jnp.zeros(k_s.shape, jnp.float32)
    if whole_rows:  # accumulated as [b, N, H, S] (_backward_block)
      zeros = jnp.swapaxes(zeros, 2, 3)
    (d_k, d_v), d_q = jax.lax.scan(
        per_queries, (zeros, zeros),
        tuple(_split(t, 2, queries) for t in (q_s, d_out_s, lse_s, delta_s)))
    if whole_rows:
      d_k, d_v = jnp.swapaxes(d_k, 2, 3), jnp.swapaxes(d_v, 2, 3)
    return _merge(d_q, 2), d_k, d_v

  d_q, d_k, d_v = jax.lax.map(
      per_samples, tuple(_split(t, 0, samples)
                         for t in (q, k, v, d_out, lse, delta)))
  return _merge(d_q, 0), _merge(d_k, 0), _merge(d_v, 0)


def _heads_major(t):
  return jnp.transpose(t, (0, 2, 1, 3))


def _scale(q):
  # Scaling the [T, H] queries is cheaper than the [T, S] scores.
  return q * jnp.asarray(q.shape[-1]**-0.5, q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q, k, v, blocks):
  q, k, v = (_heads_major(t) for t in (q, k, v))
  return _heads_major(_flash_forward(_scale(q), k, v, blocks)[0])


def _flash_fwd(q, k, v, blocks):
  q, k, v = (_heads_major(t) for t in (q, k, v))
  out, lse = _flash_forward(_scale(q), k, v, blocks)
  # Saved: inputs, output and one float per query row; no scores.
  return _heads_major(out), (q, k, v, out, lse)


def _flash_bwd(blocks, residuals, d_out):
  q, k, v, out, lse = residuals
  d_q, d_k, d_v = _flash_backward(_scale(q), k, v, out, lse,
                                  _heads_major(d_out), blocks)
  d_q = d_q * q.shape[-1]**-0.5
  return tuple(_heads_major(g).astype(t.dtype)
               for g, t in ((d_q, q), (d_k, k), (d_v, v)))


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_blocks(batch: int, num_queries: int, num_keys: int, heads: int,
                 block_bytes: Optional[int] = None):
  """(samples, queries, key_block) for `flash_attention`.

  Up to ROW_KEYS keys: whole rows (key_block == num_keys), as many queries
  and samples as fit in `block_bytes` (default BLOCK_BYTES) of float32
  scores. Longer rows: up to QUERY_BLOCK queries against key blocks of up
  to KEY_BLOCK keys, within `block_bytes` (default KEY_BLOCKED_BYTES)."""
  row_bytes = heads * num_keys * 4  # one query's float32 scores
  rows_budget = block_bytes or BLOCK_BYTES
  if num_keys <= ROW_KEYS and row_bytes <= rows_budget:
    queries = _largest_divisor_at_most(num_queries, rows_budget // row_bytes)
    samples = _largest_divisor_at_most(
        batch, rows_budget // (queries * row_bytes))
    return samples, queries, num_keys
  block_bytes = block_bytes or KEY_BLOCKED_BYTES
  queries = _largest_divisor_at_most(num_queries, min(
      QUERY_BLOCK, block_bytes // (heads * 4 * min(num_keys, KEY_BLOCK))))
  key_block = _largest_divisor_at_most(num_keys, min(
      KEY_BLOCK, block_bytes // (heads * queries * 4)))
  return 1, queries, key_block


def flash_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                    blocks: Optional[tuple] = None) -> jnp.ndarray:
  """Blocked softmax attention with a recomputing backward pass.

  Args:
    q: [B, T, N, H] queries; k, v: [B, S, N, H].
    blocks: (samples, queries, key_block), each dividing B, T, S; default
      `flash_blocks`.

  Returns:
    [B, T, N, H] in v's dtype: softmax(q k^T / sqrt(H)) v.
  """
  batch, num_queries, heads, _ = q.shape
  num_keys = k.shape[1]
  if blocks is None:
    blocks = flash_blocks(batch, num_queries, num_keys, heads)
  blocks = tuple(int(b) for b in blocks)
  for size, block, what in zip((batch, num_queries, num_keys), blocks,
                               ("samples", "queries", "key_block")):
    if size % block:
      raise ValueError(f"flash_attention: {what} block {block} does not "
                       f"divide {size}")
  return _flash(q, k, v, blocks)


def _cudnn_attention(q, k, v) -> Optional[jnp.ndarray]:
  """cuDNN's fused attention, or None where it declines the call (dtype,
  head size, GPU generation: it says so at trace time)."""
  try:
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  except (ValueError, NotImplementedError, RuntimeError,
          jax.errors.JaxRuntimeError):
    return None


def attention_path(batch: int, num_queries: int, num_keys: int, heads: int,
                   dtype, backend: Optional[str] = None) -> str:
  """The path `dot_product_attention` takes: "cudnn" (tried first on GPUs,
  bf16/f16 only), "flash" or "xla"."""
  backend = backend or jax.default_backend()
  scores = num_queries * num_keys
  if backend == "gpu":
    if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
      return "cudnn"
    return "flash" if scores >= GPU_MIN_SCORES else "xla"
  if backend == "cpu" and scores >= CPU_MIN_SCORES:
    return "flash"
  del batch, heads
  return "xla"


def dot_product_attention(q: jnp.ndarray, k: jnp.ndarray,
                          v: jnp.ndarray) -> jnp.ndarray:
  """Softmax attention, [B, T, N, H] x [B, S, N, H] -> [B, T, N, H], by
  the path `attention_path` picks (cuDNN falling back to the blocked JAX
  attention for long sequences, XLA's for short ones)."""
  batch, num_queries, heads, _ = q.shape
  path = attention_path(batch, num_queries, k.shape[1], heads, q.dtype)
  if path == "cudnn":
    out = _cudnn_attention(q, k, v)
    if out is not None:
      return out
    path = ("flash" if num_queries * k.shape[1] >= GPU_MIN_SCORES else "xla")
  if path == "flash":
    return flash_attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation="xla")

