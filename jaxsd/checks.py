"""Checking one config value: the helpers every section's checks share.

Each package checks the config section it owns (`jaxsd/data/checks.py` the
data.* fields, `jaxsd/models/checks.py` model.*, ...) with these helpers, so
every error reads alike: a `jaxsd.errors.ConfigError` naming the key, the
bad value and the valid range, e.g.
"optim.learning_rate=-1.0 must be > 0 (a finite number)". A command-line
flag passes its key as "--name": "--steps=0: steps must be >= 1 (an
integer)." `jaxsd.config_checks` runs the sections in order.

Imports nothing of jaxsd but its errors, so any module may import it.
"""
import math
import numbers
from typing import Optional, Sequence

from jaxsd.errors import ConfigError

INT64 = (-2**63, 2**63 - 1)  # the range of an int64, e.g. a jax.random seed


def get(config, dotted: str):
  """config["a"]["b"] for dotted "a.b"."""
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def is_int(value) -> bool:
  """An integer, and not a bool (True is an int to Python, not to a config)."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def fail(key: str, value, rule: str, hint: str = "") -> ConfigError:
  """A ConfigError: "key=value must be rule; hint." A command-line flag
  (key "--name") reads "--name=value: name must be rule; hint."."""
  hint = f"; {hint}" if hint else ""
  if key.startswith("--"):
    return ConfigError(f"{key}={value!r}: {key[2:]} must be {rule}{hint}.")
  return ConfigError(f"{key}={value!r} must be {rule}{hint}.")


def _num(value) -> str:
  """0.0 -> "0", 1e-08 -> "1e-08", 2**63 - 1 -> "9223372036854775807"."""
  if isinstance(value, float) and value.is_integer():
    return str(int(value))
  return str(value)


def range_text(low, high, low_open: bool, high_open: bool) -> str:
  """"in [0, 1)", ">= 1", "< 5"; "" when unbounded."""
  low = None if low is None else _num(low)
  high = None if high is None else _num(high)
  if low is not None and high is not None:
    return (f"in {'(' if low_open else '['}{low}, {high}"
            f"{')' if high_open else ']'}")
  if low is not None:
    return f"{'>' if low_open else '>='} {low}"
  if high is not None:
    return f"{'<' if high_open else '<='} {high}"
  return ""


def check_int(key: str, value, low: Optional[int] = 1,
              high: Optional[int] = None, hint: str = "") -> int:
  """value is an integer in [low, high] (None: unbounded); returns it."""
  ok = is_int(value) and (low is None or value >= low) and (
      high is None or value <= high)
  if not ok:
    bounds = range_text(low, high, False, False)
    rule = f"{bounds} (an integer)" if bounds else "an integer"
    raise fail(key, value, rule, hint)
  return value


def check_float(key: str, value, low: Optional[float] = None,
                high: Optional[float] = None, *, low_open: bool = False,
                high_open: bool = False, hint: str = "") -> float:
  """value is a finite number (an int will do) in the range; returns it."""
  ok = is_number(value) and math.isfinite(value)
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if not ok:
    bounds = range_text(low, high, low_open, high_open)
    rule = f"{bounds} (a finite number)" if bounds else "a finite number"
    raise fail(key, value, rule, hint)
  return float(value)


def check_choice(key: str, value, choices: Sequence, hint: str = ""):
  if value not in choices:
    raise fail(key, value, f"one of {list(choices)}", hint)
  return value


def check_channels(key: str, value) -> tuple:
  """A non-empty sequence of integers >= 1 (channels per level, heads per
  block); returns it as a tuple."""
  if (isinstance(value, (str, bytes)) or not hasattr(value, "__len__")
      or not value or not all(is_int(v) and v >= 1 for v in value)):
    raise fail(key, value, "a non-empty sequence of integers >= 1")
  return tuple(value)


def check_interval(key: str, value):
  """(lo, hi) with 0 <= lo < hi <= 1 (fractions of the diffusion time);
  returns it as floats. Flags give strings."""
  rule = ("two numbers lo,hi with 0 <= lo < hi <= 1 (fractions of the "
          "diffusion time, 1 = pure noise; 0,1 = every step)")
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError):
    raise fail(key, value, rule) from None
  if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo < hi <= 1.0):
    raise fail(key, value, rule)
  return lo, hi


def wrapped(key_hint: str, fn, *args, **kwargs):
  """fn(*args), its ValueError re-raised as a ConfigError (naming key_hint
  when its message does not): the owner's own parser (a registry lookup, a
  LoRA config) is the check, so its message stays the one users see."""
  try:
    return fn(*args, **kwargs)
  except ConfigError:
    raise
  except ValueError as e:
    message = str(e)
    if key_hint not in message:
      message = f"{key_hint}: {message}"
    raise ConfigError(message) from e
