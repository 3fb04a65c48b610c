"""The text side: a pretrained FlaxCLIPTextModel from a folder is loaded and
its weights are the ones the run encodes with."""
import jax
import numpy as np
import transformers

from jaxsd import build
from jaxsd import text as text_lib


def _tiny_clip_text(tmp_path, vocab_size):
  config = transformers.CLIPTextConfig(
      vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
      bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
  model = transformers.FlaxCLIPTextModel(config, seed=3)
  path = str(tmp_path / "clip_text")
  model.save_pretrained(path)
  return model, path


def test_pretrained_text_encoder_is_loaded_and_used(tiny_config, tokenizer,
                                                    tmp_path):
  model, path = _tiny_clip_text(tmp_path, text_lib.vocab_size(tokenizer))
  config = tiny_config()
  config.text.pretrained = path
  comps = build.build_components(config)
  assert comps.text_encoder.hidden_size == 32
  params = {"text": comps.text_encoder.init(jax.random.key(0))}
  saved = jax.tree_util.tree_leaves_with_path(model.params)
  loaded = dict(jax.tree_util.tree_leaves_with_path(params["text"]))
  assert len(saved) == len(loaded)
  for key, value in saved:
    np.testing.assert_array_equal(np.asarray(loaded[key]), np.asarray(value))
  # The run's encoding is the saved model's last hidden state.
  ids = text_lib.tokenize(tokenizer, ["a photograph of the number 3", ""],
                          config.text.max_length)
  ours = comps.encode(params, ids)
  theirs = model(ids, attention_mask=np.ones_like(ids)).last_hidden_state
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
  # A different seed's random encoder would encode differently.
  fresh = text_lib.TextEncoder(tiny_config().text,
                               text_lib.vocab_size(tokenizer))
  assert not np.allclose(fresh(fresh.init(jax.random.key(0)), ids), ours)
