"""The config a run was trained with: WORKDIR/config.json (written when a
run starts) and the copy inside every checkpoint's metadata, which
sampling, evaluation and export read first."""
import json
import os
from typing import Optional

import jax
import ml_collections

from jaxsd import environment
from jaxsd.checkpointing import checkpoints as checkpoint

CONFIG_FILE = "config.json"


def save_config(config, workdir: str):
  """WORKDIR/config.json, atomically (process 0)."""
  if jax.process_index() == 0:
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(path + ".tmp", path)


def read_saved_config(workdir: str):
  """WORKDIR/config.json as a dict, or None when it is missing or does not
  parse."""
  try:
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def load_run_config(workdir: str, step: Optional[int] = None):
  """The config a run in `workdir` was trained with, resolved for this
  machine (jaxsd.environment): the one saved inside its checkpoint of
  `step` (default: the latest), so a damaged or overwritten config.json
  orphans no checkpoint; WORKDIR/config.json when no checkpoint has one."""
  saved = _checkpoint_config(workdir, step)
  path = os.path.join(workdir, CONFIG_FILE)
  if saved is None:
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"{path} not found: {workdir!r} is not a jaxsd training workdir "
          "(train with `python -m jaxsd.main --config=... --workdir=...` "
          "first).")
    with open(path) as f:
      saved = json.load(f)
  return environment.resolve(ml_collections.ConfigDict(saved), reopened=True)


def _checkpoint_config(workdir: str, step: Optional[int]):
  """The config dict in a checkpoint's metadata, or None (no checkpoint,
  one from before configs were saved in them, or unreadable: then the
  restore that follows names the damage)."""
  if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    return None
  mngr = checkpoint.manager(workdir, read_only=True)
  try:
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
      return None
    return checkpoint.read_meta(mngr, step).get("config")
  except Exception:  # pylint: disable=broad-except
    return None
  finally:
    mngr.close()
