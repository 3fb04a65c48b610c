"""A save makes room first (the checkpoints keep_checkpoints would drop go
before the new one is written, never the newest), a failed save says how
much to free, and orbax's own reports of it stay off the console."""
import logging as logging_std
import os

import jax.numpy as jnp
import pytest

from jaxsd import errors
from jaxsd.checkpointing import checkpoints as checkpoint
from jaxsd.commands import cli


def _state(value: float):
  return {"w": jnp.full((64,), value, jnp.float32)}


def _no_space(*args, **kwargs):
  raise OSError(28, "No space left on device")


@pytest.mark.parametrize("keep,left", [(2, [2]), (3, [1, 2]), (1, [2])])
def test_a_failed_save_keeps_the_newest_checkpoint_and_says_what_to_free(
    tmp_path, monkeypatch, keep, left):
  mngr = checkpoint.manager(str(tmp_path), keep=keep)
  for step in (1, 2):
    checkpoint.save(mngr, step, _state(step), {"step": step})
  assert mngr.all_steps() == ([2] if keep == 1 else [1, 2])
  monkeypatch.setattr(mngr, "save", _no_space)
  with pytest.raises(errors.CheckpointError) as e:
    checkpoint.save(mngr, 3, _state(3.0), {"step": 3})
  message = str(e.value)
  assert "\n" not in message
  assert "no space left" in message and "Free at least" in message
  assert "the last good checkpoint is step 2, intact" in message
  # keep=2: step 1 would be dropped after saving 3, so it went first; the
  # newest (2) always stays, also with keep=1.
  assert sorted(mngr.all_steps()) == left
  assert sorted(os.listdir(checkpoint.checkpoint_dir(str(tmp_path)))) == [
      str(s) for s in left]
  mngr.close()


def test_remove_partial_saves_leaves_finished_checkpoints(tmp_path):
  for name in ("2", "4.orbax-checkpoint-tmp-123", "6.orbax-checkpoint-tmp-9"):
    os.makedirs(tmp_path / name / "state")
  checkpoint.remove_partial_saves(str(tmp_path))
  assert os.listdir(tmp_path) == ["2"]


def _record(name, pathname, level, msg, exc=False):
  exc_info = None
  if exc:
    try:
      raise ValueError("RESOURCE_EXHAUSTED: No space left on device")
    except ValueError:
      import sys  # pylint: disable=g-import-not-at-top
      exc_info = sys.exc_info()
  return logging_std.LogRecord(name, level, pathname, 1, msg, (), exc_info)


def test_console_filter_keeps_orbax_errors_to_one_line():
  quiet = cli._QuietLibraries()  # pylint: disable=protected-access
  orbax = "/site-packages/orbax/checkpoint/_src/future.py"
  info = _record("absl", orbax, logging_std.INFO, "saving")
  assert not quiet.filter(info)
  error = _record("absl", orbax, logging_std.ERROR, "raised", exc=True)
  assert quiet.filter(error) and error.exc_info is None
  task = _record("asyncio", "/lib/asyncio/base_events.py", logging_std.ERROR,
                 "Task exception was never retrieved\nfuture: <Task coro="
                 "<f() defined at /site-packages/orbax/x.py:1>>", exc=True)
  assert not quiet.filter(task)
  own = _record("absl", "/work/jaxsd/training/loop.py", logging_std.INFO,
                "step 1/2", exc=False)
  assert quiet.filter(own)
