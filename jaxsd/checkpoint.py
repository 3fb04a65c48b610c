"""Checkpoints with orbax: train state plus run metadata, atomic and resumable.

Layout: WORKDIR/checkpoints/<step>/{state,meta}. orbax writes each step to a
temporary folder and renames it when complete, so a crash mid-save leaves the
previous checkpoint intact and the partial one is ignored.
"""
import os
from typing import Any, Dict, Optional, Tuple

import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(workdir: str, keep: Optional[int] = None,
            read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, read_only=read_only,
      # Saves happen exactly when the train loop asks.
      save_interval_steps=1)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any,
         meta: Dict[str, Any]):
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True)


def restore(mngr: ocp.CheckpointManager, abstract_state: Any,
            step: Optional[int] = None) -> Tuple[Any, Dict[str, Any], int]:
  """Restores (state, meta, step); abstract_state carries target shardings."""
  step = latest_step_or_raise(mngr) if step is None else step
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      meta=ocp.args.JsonRestore()))
  return out["state"], out["meta"], step


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
    out = restore_partial(mngr, step, {key: abstract_params})
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
