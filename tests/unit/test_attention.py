"""The attention paths (jaxsd/models/attention.py) against the textbook
formula in float32: values and gradients, f32 and bf16."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.models import attention


def plain_attention(q, k, v):
  """softmax(q k^T / sqrt(H)) v with every score at once, in float32."""
  f32 = lambda t: t.astype(jnp.float32)
  logits = jnp.einsum("btnh,bsnh->bnts", f32(q), f32(k)) / np.sqrt(
      q.shape[-1])
  return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1),
                    f32(v))


def _inputs(shape, num_keys, dtype, seed=0):
  b, t, n, h = shape
  keys = jax.random.split(jax.random.key(seed), 4)
  q = 2.0 * jax.random.normal(keys[0], shape)  # peaked softmax rows too
  k, v = (jax.random.normal(key, (b, num_keys, n, h)) for key in keys[1:3])
  d_out = jax.random.normal(keys[3], shape)
  return tuple(x.astype(dtype) for x in (q, k, v, d_out))


def _values_and_grads(fn, q, k, v, d_out):
  out, pullback = jax.vjp(fn, q, k, v)
  return (out,) + pullback(d_out.astype(out.dtype))


# (q shape, keys, blocks): whole rows by queries and samples, key blocks
# (online softmax), cross-attention (S != T), uneven defaults.
CASES = [
    ((2, 64, 3, 8), 64, (1, 16, 64)),
    ((2, 64, 3, 8), 64, (2, 8, 16)),
    ((1, 48, 2, 16), 77, (1, 12, 7)),
    ((3, 100, 2, 8), 100, None),
    ((1, 256, 4, 8), 256, (1, 64, 32)),
]


@pytest.mark.parametrize("shape,num_keys,blocks", CASES)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5),
                                       (jnp.bfloat16, 3e-2)])
def test_flash_attention_equals_plain_attention(shape, num_keys, blocks,
                                                dtype, tol):
  q, k, v, d_out = _inputs(shape, num_keys, dtype)
  got = jax.jit(lambda *a: _values_and_grads(
      functools.partial(attention.flash_attention, blocks=blocks), *a))(
          q, k, v, d_out)
  # The oracle in float32 from the same (rounded) inputs.
  f32 = [x.astype(jnp.float32) for x in (q, k, v, d_out)]
  # Jitted: op by op, each op would compile on its own (tens of ms each).
  expected = jax.device_get(jax.jit(lambda *a: _values_and_grads(
      plain_attention, *a))(*f32))
  for name, g, e in zip(("out", "d_q", "d_k", "d_v"), got, expected):
    assert g.dtype == dtype, name
    scale = float(np.abs(e).max())
    assert scale > 0.05, name  # not vacuous
    np.testing.assert_allclose(np.asarray(g, np.float32), e,
                               atol=tol * max(scale, 1.0), rtol=0,
                               err_msg=name)


def test_flash_attention_keeps_no_scores():
  """What the backward pass keeps grows with T, not T^2: at 2048 tokens
  the saved residuals are q, k, v, the output and one float per row."""
  shape = jax.ShapeDtypeStruct((1, 2048, 2, 8), jnp.float32)
  pullback = jax.eval_shape(
      lambda q, k, v: jax.vjp(attention.flash_attention, q, k, v)[1],
      shape, shape, shape)
  saved = sum(x.size for x in jax.tree_util.tree_leaves(pullback))
  assert saved <= 4 * 2048 * 2 * 8 + 2048 * 2  # scores would be 2048^2 * 2


def test_blocks_cover_long_rows_with_key_blocks():
  """Rows over ROW_KEYS keys, or one query's scores over the block budget:
  key blocks, within the budget."""
  # SD-1.5's 64x64 latents: 512 queries x 512 keys (8 MiB at 8 heads).
  assert attention.flash_blocks(2, 4096, 4096, 8) == (1, 512, 512)
  assert attention.flash_blocks(1, 1024, 1024, 8) == (1, 128, 1024)  # rows
  # A 64 KiB budget: 4 queries against 512-key blocks.
  samples, queries, key_block = attention.flash_blocks(
      2, 4096, 4096, 8, block_bytes=64 * 1024)
  assert (samples, queries, key_block) == (1, 4, 512)
  assert 8 * queries * key_block * 4 <= 64 * 1024
  # Sizes without large divisors still divide.
  samples, queries, key_block = attention.flash_blocks(1, 4099, 2053, 8)
  assert 4099 % queries == 0 and 2053 % key_block == 0


def test_flash_attention_rejects_blocks_that_do_not_divide():
  q = jnp.zeros((1, 10, 1, 4))
  with pytest.raises(ValueError, match="queries block 4 does not divide 10"):
    attention.flash_attention(q, q, q, blocks=(1, 4, 10))


@pytest.mark.parametrize("backend,dtype,tokens,path", [
    ("cpu", jnp.float32, 4096, "flash"),
    ("cpu", jnp.bfloat16, 64, "xla"),
    ("gpu", jnp.bfloat16, 4096, "cudnn"),
    ("gpu", jnp.float32, 4096, "flash"),
    ("gpu", jnp.float32, 256, "xla"),
])
def test_attention_path_by_backend_dtype_and_length(backend, dtype, tokens,
                                                    path):
  assert attention.attention_path(1, tokens, tokens, 8, dtype,
                                  backend) == path


def test_dot_product_attention_takes_the_blocked_path_for_long_sequences(
    monkeypatch):
  """On CPU, above the threshold, the UNet's attention is the blocked one
  (no [T, S] buffer in its program) and equals plain attention."""
  if jax.default_backend() != "cpu":
    pytest.skip("the CPU choice")
  monkeypatch.setattr(attention, "BLOCK_BYTES", 16 * 1024)  # 16-query blocks
  q, k, v, _ = _inputs((1, 128, 2, 8), 128, jnp.float32)
  hlo = jax.jit(attention.dot_product_attention).lower(q, k, v).as_text()
  assert "128x128" not in hlo.replace(",", "x")
  np.testing.assert_allclose(attention.dot_product_attention(q, k, v),
                             plain_attention(q, k, v), atol=2e-5)
