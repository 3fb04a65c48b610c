"""The text side: a pretrained FlaxCLIPTextModel from a folder is loaded and
its weights are the ones the run encodes with."""
import jax
import jax.numpy as jnp
import numpy as np
import transformers

from jaxsd.diffusion import setup as build
from jaxsd.text import encoder as text_lib


def _tiny_clip_text(tmp_path, vocab_size):
  config = transformers.CLIPTextConfig(
      vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
      bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
  # Initialised under jit: transformers' own init runs op by op (seconds).
  model = transformers.FlaxCLIPTextModel(config, _do_init=False)
  params = jax.jit(model.init_weights, static_argnums=1)(jax.random.key(3),
                                                          (1, 1))
  path = str(tmp_path / "clip_text")
  model.save_pretrained(path, params=params)
  return model, params, path


def test_pretrained_text_encoder_is_loaded_and_used(tiny_config, tokenizer,
                                                    tmp_path):
  model, saved_params, path = _tiny_clip_text(tmp_path,
                                              text_lib.vocab_size(tokenizer))
  config = tiny_config()
  config.text.pretrained = path
  comps = build.build_components(config)
  assert comps.text_encoder.hidden_size == 32
  params = {"text": comps.text_encoder.init(jax.random.key(0))}
  saved = jax.tree_util.tree_leaves_with_path(saved_params)
  loaded = dict(jax.tree_util.tree_leaves_with_path(params["text"]))
  assert len(saved) == len(loaded)
  for key, value in saved:
    np.testing.assert_array_equal(np.asarray(loaded[key]), np.asarray(value))
  # The run's encoding is the saved model's last hidden state.
  ids = text_lib.tokenize(tokenizer, ["a photograph of the number 3", ""],
                          config.text.max_length)
  # Jitted: op-by-op, every op would compile on its own.
  ours = jax.jit(comps.encode)(params, ids)
  theirs = jax.jit(lambda i: model(i, attention_mask=jnp.ones_like(i),
                                   params=saved_params).last_hidden_state)(ids)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
  # A different seed's random encoder would encode differently.
  fresh = text_lib.TextEncoder(tiny_config().text,
                               text_lib.vocab_size(tokenizer))
  assert not np.allclose(jax.jit(fresh)(fresh.init(jax.random.key(0)), ids),
                         ours)
