"""Text side: CLIP tokenizer and transformers' FlaxCLIPTextModel.

A tokenizer folder comes in two layouts: transformers 4 writes the slow
tokenizer's `vocab.json` + `merges.txt` (and usually `tokenizer.json` too);
transformers 5 (and so a pipeline saved by today's PyTorch diffusers) writes
`tokenizer.json` + `tokenizer_config.json` only. `load_tokenizer` reads the
first with `CLIPTokenizer`, the second with `CLIPTokenizerFast`; both give
the same token ids (tests/test_interop_today.py), except for CJK text, which
the slow tokenizer without `ftfy` installed splits character by character.
`save_tokenizer` writes both layouts.

The encoder is fresh, or pretrained (`text.pretrained`): a hub id or folder of
Flax weights (flax_model.msgpack) through transformers, or a folder of
PyTorch weights (a `text_encoder/` folder or an SD pipeline folder holding
one) through jaxsd's own conversion (`jaxsd.models.clip_convert`).
`save_text_encoder` writes the PyTorch form back.
"""
import os
from typing import Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from jaxsd import hub
from jaxsd.errors import TokenizerError
from jaxsd.models import clip_convert

# The slow tokenizer's files (transformers 4's layout) and the fast one's.
SLOW_TOKENIZER_FILES = ("vocab.json", "merges.txt")
FAST_TOKENIZER_FILE = "tokenizer.json"


def _from_pretrained(cls, name: str, what: str, config_key: str, **kwargs):
  """cls.from_pretrained(name) that fails fast, with a fix, when offline."""
  if os.path.isdir(name):
    return cls.from_pretrained(name, **kwargs)
  try:  # hub id already in the local cache
    return cls.from_pretrained(name, local_files_only=True, **kwargs)
  except (OSError, ValueError, TypeError):  # not cached, or cached in part
    pass
  if not hub.network_available("huggingface.co"):
    raise RuntimeError(
        f"Cannot load the {what} {name!r}: it is not a local folder, not in the "
        f"Hugging Face cache, and the hub is unreachable. Set {config_key} to a "
        "local folder" + (" (or the JAXSD_CLIP_TOKENIZER environment variable)"
                          if config_key == "text.tokenizer" else "") + ".")
  return cls.from_pretrained(name, **kwargs)


def tokenizer_class(folder: str):
  """The transformers class that reads the tokenizer folder: CLIPTokenizer
  when it holds vocab.json and merges.txt, else CLIPTokenizerFast when it
  holds tokenizer.json.

  Raises:
    TokenizerError: neither layout is complete (the message names the folder,
      the files it holds and the ones expected).
  """
  import transformers  # pylint: disable=g-import-not-at-top
  if all(os.path.isfile(os.path.join(folder, f))
         for f in SLOW_TOKENIZER_FILES):
    return transformers.CLIPTokenizer
  if os.path.isfile(os.path.join(folder, FAST_TOKENIZER_FILE)):
    return transformers.CLIPTokenizerFast
  held = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
  raise TokenizerError(
      f"Cannot read the CLIP tokenizer in {folder}: it holds "
      f"{', '.join(held) if held else 'no files'}; expected "
      f"{FAST_TOKENIZER_FILE} (transformers 5's layout) or "
      f"{' + '.join(SLOW_TOKENIZER_FILES)} (transformers 4's).")


def load_tokenizer_folder(folder: str):
  """The CLIP tokenizer saved in `folder`, in either layout (see
  `tokenizer_class`); a file that does not parse is a TokenizerError."""
  cls = tokenizer_class(folder)
  try:
    return cls.from_pretrained(folder)
  except Exception as e:  # pylint: disable=broad-except
    # transformers and tokenizers raise many types for a damaged file
    # (OSError, ValueError, TypeError, tokenizers' Exception).
    files = (FAST_TOKENIZER_FILE if cls.__name__.endswith("Fast")
             else " + ".join(SLOW_TOKENIZER_FILES))
    why = " ".join(str(e).split())[:200]
    raise TokenizerError(
        f"Cannot read the CLIP tokenizer in {folder} ({files}): "
        f"{type(e).__name__}: {why}") from e


def load_tokenizer(name: str):
  """The CLIP tokenizer of a local folder (either layout) or a hub id
  (CLIPTokenizer), config text.tokenizer."""
  import transformers  # pylint: disable=g-import-not-at-top
  if not name:
    raise ValueError("text.tokenizer is empty; set it to a hub id or a folder "
                     "(or the JAXSD_CLIP_TOKENIZER environment variable).")
  if os.path.isdir(name):
    return load_tokenizer_folder(name)
  return _from_pretrained(transformers.CLIPTokenizer, name, "tokenizer",
                          "text.tokenizer")


def save_tokenizer(tokenizer, folder: str):
  """Writes the tokenizer to `folder` in both layouts: tokenizer.json for
  transformers 5 (and the fast tokenizer), vocab.json + merges.txt for
  transformers 4's CLIPTokenizer, which a diffusers 0.39 pipeline loads.

  A slow tokenizer writes no tokenizer.json: the fast one converted from its
  files does. A fast tokenizer read from tokenizer.json alone cannot write
  the slow files through save_pretrained: its BPE model writes them.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  tokenizer.save_pretrained(folder)
  if not tokenizer.is_fast:
    transformers.CLIPTokenizerFast.from_pretrained(folder).save_pretrained(
        folder, legacy_format=False)
  elif not all(os.path.isfile(os.path.join(folder, f))
               for f in SLOW_TOKENIZER_FILES):
    tokenizer.backend_tokenizer.model.save(folder)


def tokenize(tokenizer, texts: Sequence[str], max_length: int,
             warn_truncation: bool = False) -> np.ndarray:
  """Token ids int32 [len(texts), max_length], padded and truncated."""
  texts = list(texts)
  if warn_truncation:
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    for text, n in zip(texts, lengths):
      if n > max_length:
        logging.warning("Prompt %r has %d tokens; truncated to the text "
                        "encoder's context of %d.", text, n, max_length)
  out = tokenizer(texts, padding="max_length", max_length=max_length,
                  truncation=True, return_tensors="np")
  return out["input_ids"].astype(np.int32)


def text_encoder_config(text_config, vocab_size: int):
  """A CLIPTextConfig for a freshly initialised encoder."""
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.CLIPTextConfig(
      vocab_size=vocab_size,
      hidden_size=text_config.hidden_size,
      intermediate_size=text_config.intermediate_size,
      num_hidden_layers=text_config.num_layers,
      num_attention_heads=text_config.num_heads,
      max_position_embeddings=max(77, text_config.max_length),
      # CLIP's tokenizer: 49406 = <|startoftext|>, 49407 = <|endoftext|>.
      bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


class TextEncoder:
  """FlaxCLIPTextModel as a pure function of (params, input_ids)."""

  def __init__(self, text_config, vocab_size: int):
    import transformers  # pylint: disable=g-import-not-at-top
    self.max_length = text_config.max_length
    pretrained = text_config.pretrained
    folder = pretrained and os.path.isdir(pretrained) and (
        clip_convert.text_encoder_folder(pretrained) or pretrained)
    if folder and not clip_convert.has_flax_weights(folder):
      # PyTorch weights (a text_encoder/ or SD pipeline folder): converted
      # by jaxsd, with no torch import and no pickled code run.
      self.module, params, config = clip_convert.load_text_encoder(folder)
      self._pretrained_params = params
    elif pretrained:
      # _do_init=False: the saved weights without a random (op-by-op,
      # slow) initialisation first.
      model, params = _from_pretrained(transformers.FlaxCLIPTextModel,
                                       folder or pretrained, "text encoder",
                                       "text.pretrained", _do_init=False)
      self.module, config = model.module, model.config
      self._pretrained_params = params
    else:
      model = transformers.FlaxCLIPTextModel(
          text_encoder_config(text_config, vocab_size), _do_init=False)
      self.module, config = model.module, model.config
      self._pretrained_params = None
    if config.max_position_embeddings < self.max_length:
      raise ValueError(
          f"text.max_length={self.max_length} exceeds the encoder's "
          f"{config.max_position_embeddings} positions.")
    self.config = config  # transformers.CLIPTextConfig (save_text_encoder)
    self.hidden_size = config.hidden_size

  def init(self, rng) -> dict:
    if self._pretrained_params is not None:
      return jax.tree_util.tree_map(jnp.asarray, self._pretrained_params)
    ids = jnp.zeros((1, self.max_length), jnp.int32)
    return jax.jit(self._init_fn)(rng, ids)

  def _init_fn(self, rng, ids):
    return self.module.init(rng, ids, jnp.ones_like(ids), self._positions(ids),
                            deterministic=True)["params"]

  @staticmethod
  def _positions(ids):
    return jnp.broadcast_to(jnp.arange(ids.shape[-1]), ids.shape)

  def __call__(self, params, input_ids):
    """input_ids int32 [B, L] -> last hidden states float32 [B, L, D].

    As in Stable Diffusion all positions are attended (no padding mask); CLIP's
    causal mask keeps tokens before the padding unaffected by it.
    """
    out = self.module.apply({"params": params}, input_ids,
                            jnp.ones_like(input_ids), self._positions(input_ids),
                            deterministic=True)
    return out[0]


def save_text_encoder(config, params, folder: str):
  """Writes the encoder as transformers' PyTorch CLIPTextModel folder
  (config.json + model.safetensors); config is the encoder's CLIPTextConfig
  (`TextEncoder.config`), params its {"text_model": ...} params."""
  clip_convert.save_text_encoder(config, params, folder)


def empty_prompt_ids(tokenizer, max_length: int) -> np.ndarray:
  """Token ids [1, L] of the empty prompt, the unconditional input of CFG."""
  return tokenize(tokenizer, [""], max_length)


def vocab_size(tokenizer) -> int:
  return len(tokenizer)
