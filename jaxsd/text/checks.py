"""The text.* section of a run's config: the text encoder's valid ranges."""
from jaxsd.checks import check_int
from jaxsd.errors import ConfigError


def check_text(config):
  """text.*: caption length in tokens and a fresh encoder's architecture
  (ignored, but still typed, when text.pretrained names one)."""
  t = config.text
  check_int("text.max_length", t.max_length, 1)
  for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
    check_int(f"text.{key}", t[key], 1)
  if not t.pretrained and t.hidden_size % t.num_heads:
    raise ConfigError(
        f"text.hidden_size={t.hidden_size} must be a multiple of "
        f"text.num_heads={t.num_heads} (each head gets hidden_size / "
        "num_heads dimensions).")
