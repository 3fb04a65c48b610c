"""Checkpoints with orbax: train state plus run metadata, atomic and resumable.

Layout: WORKDIR/checkpoints/<step>/{state,meta}. orbax writes each step to a
temporary folder and renames it when complete, so a crash mid-save leaves the
previous checkpoint intact and the partial one is ignored. A save that fails
(a full disk) removes its partial folder and stops with one line; a
checkpoint that cannot be read is named by step and path, and training moves
it aside as `<step>.corrupt` and takes the newest readable one.
"""
import errno
import glob
import os
import shutil
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from absl import logging
import orbax.checkpoint as ocp

from jaxsd import errors

CORRUPT_SUFFIX = ".corrupt"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(workdir: str, keep: Optional[int] = None,
            read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, read_only=read_only,
      # Saves happen exactly when the train loop asks.
      save_interval_steps=1)
  mngr = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=("state", "meta"))
  mngr.jaxsd_keep = keep  # what save() makes room for (orbax keeps it private)
  return mngr


def save(mngr: ocp.CheckpointManager, step: int, state: Any,
         meta: Dict[str, Any]):
  """Writes the checkpoint of `step` and waits until it is complete, so a
  failure is this call's: its partial folder is removed and CheckpointError
  says why, what it needs and the last good step."""
  _make_room(mngr, step)
  try:
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              force=True)
    mngr.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _save_failed(mngr, step, state, e) from e


def _make_room(mngr: ocp.CheckpointManager, step: int):
  """Deletes, before writing `step`, the oldest checkpoints that orbax would
  delete right after it (beyond `keep`), so that a nearly full disk has
  their space for the new one. Only when `keep` >= 2: the newest good
  checkpoint always survives a save that fails."""
  keep = getattr(mngr, "jaxsd_keep", None)
  if not keep or keep < 2:
    return
  older = sorted(s for s in mngr.all_steps() if s < step)
  for old in older[:max(len(older) + 1 - keep, 0)]:
    mngr.delete(old)


def _no_space(e: BaseException) -> bool:
  """Whether `e`, or what caused it, is a full disk (OSError ENOSPC, or
  TensorStore's RESOURCE_EXHAUSTED as orbax reports it)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    text = str(e)
    if "No space left" in text or "RESOURCE_EXHAUSTED" in text or (
        "Disk quota exceeded" in text):
      return True
    e = e.__cause__ or e.__context__
  return False


def _nbytes(tree: Any) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return int(sum(getattr(x, "nbytes", 0)
                 for x in jax.tree_util.tree_leaves(tree)))


def remove_partial_saves(directory: str, step: Optional[int] = None,
                         settle_s: float = 1.0):
  """Removes the temporary folders of unfinished saves in `directory` (of
  `step`, or of every step: what a run stopped mid-save leaves).

  The writers of a failed or interrupted save may still be creating files
  for a moment: removes until none has reappeared for half a second, or
  settle_s has passed."""
  name = f"{step}.orbax-checkpoint-tmp*" if step is not None else (
      "*.orbax-checkpoint-tmp*")
  pattern = os.path.join(directory, name)
  deadline = time.monotonic() + settle_s
  gone_since = None
  while time.monotonic() < deadline:
    paths = glob.glob(pattern)
    for path in paths:
      shutil.rmtree(path, ignore_errors=True)
    if paths:
      gone_since = None
    elif gone_since is None:
      gone_since = time.monotonic()
    elif time.monotonic() - gone_since > 0.5:
      return
    time.sleep(0.1)


def _settle(mngr: ocp.CheckpointManager, tries: int = 10):
  """Waits for orbax's pending background writes, dropping their errors.
  The manager's wait_until_finished returns at once when no finalize thread
  started (a save that failed early) and never waits for the checkpoint
  metadata writer; check_for_errors does, but re-raises the first failed
  write and leaves those queued after it: call until a round is clean."""
  for _ in range(tries):
    try:
      mngr.wait_until_finished()
      mngr.check_for_errors()
      return
    except Exception:  # pylint: disable=broad-except
      continue


def _save_failed(mngr, step: int, state: Any, e: Exception
                 ) -> errors.CheckpointError:
  directory = str(mngr.directory)
  _settle(mngr)  # let orbax's background part of the save stop first
  remove_partial_saves(directory, step, settle_s=10.0)
  # A write queued behind the failure (orbax's checkpoint metadata) may
  # have run into the removed folder: collect its error here, or the next
  # restore would raise it (FileNotFoundError for _CHECKPOINT_METADATA).
  _settle(mngr)
  try:
    mngr.reload()
  except Exception:  # pylint: disable=broad-except
    pass
  good = [s for s in mngr.all_steps() if s != step]
  last = (f"the last good checkpoint is step {max(good)}, intact" if good
          else "there is no earlier checkpoint")
  if _no_space(e):
    need, free = _nbytes(state), shutil.disk_usage(directory).free
    return errors.CheckpointError(
        f"Checkpoint of step {step} could not be written to {directory}: no "
        f"space left on the device (it needs about {need / 1e6:.0f} MB, "
        f"{free / 1e6:.0f} MB free there); the partial checkpoint was removed "
        f"and {last}. Free at least {max(need - free, 0) / 1e6 + 1:.0f} MB on "
        "that disk (older checkpoints beyond training.keep_checkpoints are "
        "already deleted before each save), then start the same command "
        "again: it resumes from there.")
  return errors.CheckpointError(
      f"Checkpoint of step {step} could not be written to {directory} "
      f"({type(e).__name__}: {first_line(e)}); the partial checkpoint was "
      f"removed and {last}.")


def first_line(e: BaseException, limit: int = 300) -> str:
  text = str(e).strip().splitlines()
  return (text[0] if text else repr(e))[:limit]


def restore(mngr: ocp.CheckpointManager, abstract_state: Any,
            step: Optional[int] = None) -> Tuple[Any, Dict[str, Any], int]:
  """Restores (state, meta, step); abstract_state carries target shardings."""
  step = latest_step_or_raise(mngr) if step is None else step
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      meta=ocp.args.JsonRestore()))
  return out["state"], out["meta"], step


def read_meta(mngr: ocp.CheckpointManager, step: int) -> Dict[str, Any]:
  """The run metadata of a checkpoint alone (its state is not read)."""
  return mngr.restore(step, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore()))["meta"]


def step_path(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mngr.directory), str(step))


def set_aside(mngr: ocp.CheckpointManager, step: int, reason: BaseException
              ) -> str:
  """Moves an unreadable checkpoint out of the way (never deletes it):
  `<step>` becomes `<step>.corrupt`; returns the new path."""
  path = step_path(mngr, step)
  target = path + CORRUPT_SUFFIX
  n = 1
  while os.path.exists(target):
    target = f"{path}{CORRUPT_SUFFIX}.{n}"
    n += 1
  os.rename(path, target)
  mngr.reload()
  logging.warning("Checkpoint of step %d cannot be read (%s: %s); moved it "
                  "aside to %s.", step, type(reason).__name__,
                  first_line(reason), target)
  return target


def unreadable(mngr: ocp.CheckpointManager, step: int, e: BaseException,
               read: Callable[[int], Any]) -> errors.CheckpointError:
  """The error for a checkpoint that cannot be read, naming the readable
  ones (each tried with `read(step)`)."""
  readable: List[int] = []
  for other in sorted(mngr.all_steps(), reverse=True):
    if other == step:
      continue
    try:
      read(other)
      readable.append(other)
    except Exception:  # pylint: disable=broad-except
      pass
  hint = (f"readable checkpoints: steps {readable} (--step={readable[0]} "
          "takes the newest)" if readable else "no other checkpoint is "
          "readable")
  return errors.CheckpointError(
      f"Checkpoint of step {step} at {step_path(mngr, step)} cannot be read "
      f"({type(e).__name__}: {first_line(e)}); {hint}. Training moves a "
      "damaged checkpoint aside and resumes from the newest readable one.")


def latest_step_or_raise(mngr: ocp.CheckpointManager) -> int:
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(
        f"No checkpoint in {mngr.directory}: train first with "
        "`python -m jaxsd.main --config=... --workdir=WORKDIR`, or point "
        "--workdir at a finished run.")
  return step


def restore_params(workdir: str, abstract_params: Any,
                   step: Optional[int] = None, use_ema: bool = True
                   ) -> Tuple[Any, int]:
  """Restores only the (EMA or raw) parameters: no optimiser state is read.

  abstract_params: jax.ShapeDtypeStruct tree (with shardings) of the params.
  Opens its own read-only manager (a manager that saved with StandardSave
  cannot also do a partial PyTree restore).
  """
  mngr = manager(workdir, read_only=True)
  try:
    if step is None:
      step = latest_step_or_raise(mngr)
    elif step not in mngr.all_steps():
      raise FileNotFoundError(
          f"No checkpoint for step {step} in {mngr.directory}; available "
          f"steps: {mngr.all_steps() or 'none'}.")
    key = "ema_params" if use_ema else "params"
    read = lambda s: restore_partial(mngr, s, {key: abstract_params})
    try:
      out = read(step)
    except Exception as e:  # pylint: disable=broad-except
      raise unreadable(mngr, step, e, read) from e
  finally:
    mngr.close()
  return out[key], step


def restore_partial(mngr: ocp.CheckpointManager, step: int, item: Any) -> Any:
  """The part `item` (a nested dict of ShapeDtypeStructs, with shardings)
  names of a checkpoint's state, read alone: nothing else is loaded."""
  return mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item=item,
          restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True)))["state"]
