"""Folders as today's PyTorch stack (diffusers 0.42 + transformers 5) saves
them, made with the pinned transformers 4.57 (transformers 5 is not
installed): the tokenizer as tokenizer.json + tokenizer_config.json only, the
CLIPTextModel's keys without the `text_model.` prefix. Shared by
tests/test_interop_today.py and tests/test_sd_pipeline.py."""
import os

from safetensors import numpy as safetensors_numpy
import transformers

PREFIX = "text_model."


def fast_only_tokenizer(source: str, folder: str) -> str:
  """The tokenizer in `source` (any layout) saved to `folder` as
  tokenizer.json + tokenizer_config.json, nothing else."""
  fast = transformers.CLIPTokenizerFast.from_pretrained(source)
  fast.save_pretrained(folder, legacy_format=False)
  for name in os.listdir(folder):
    if name not in ("tokenizer.json", "tokenizer_config.json"):
      os.remove(os.path.join(folder, name))
  assert sorted(os.listdir(folder)) == ["tokenizer.json",
                                        "tokenizer_config.json"]
  return folder


def drop_text_prefix(folder: str) -> None:
  """Rewrites folder/model.safetensors with every `text_model.` key
  unprefixed (safetensors' own writer, not jaxsd's)."""
  path = os.path.join(folder, "model.safetensors")
  tensors = safetensors_numpy.load_file(path)
  assert any(k.startswith(PREFIX) for k in tensors)
  renamed = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v
             for k, v in tensors.items()}
  assert "embeddings.token_embedding.weight" in renamed
  assert "final_layer_norm.weight" in renamed
  safetensors_numpy.save_file(renamed, path, metadata={"format": "pt"})
