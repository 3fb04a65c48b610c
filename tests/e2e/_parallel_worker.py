"""Runs jaxsd in its own process for tests/e2e/test_parallel_runs.py.

The device count (XLA_FLAGS) and the process group (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID) are fixed when JAX starts, so each setting
needs a fresh process. Usage:

  python tests/_parallel_worker.py '{"train": [{"workdir": W, "tag": T,
      "overrides": {"parallel.fsdp": true}, "sigterm_at": [PROCESS, STEP]},
      ...], "restore": [{"workdir": W, "step": S, "overrides": {...},
      "out": "leaves.npz"}, ...]}'

Overrides are flattened keys of configs/tiny.py. A train job writes
WORKDIR/<tag>_<process>.json with the final step and how the state was
sharded; a restore writes every state array to an .npz.
"""
import json
import os
import sys

import jax
import numpy as np

import helpers  # tests/ is on PYTHONPATH (test_parallel_runs.py sets it)

tiny_config = helpers.tiny_config
state_leaves = helpers.leaves  # every array of a TrainState, in tree order


def sharded_fraction(state) -> dict:
  """How many state arrays are split, the fraction of all elements they
  hold, and the largest share of a split array one device holds."""
  leaves = jax.tree_util.tree_leaves(state)
  split = [x for x in leaves if not x.sharding.is_fully_replicated]
  share = max((x.addressable_shards[0].data.size / x.size for x in split),
              default=1.0)
  return {"arrays": len(leaves), "split": len(split), "max_share": share,
          "split_elements": sum(x.size for x in split)
                            / sum(x.size for x in leaves)}


def restore_state(workdir, overrides, step=None):
  """A checkpoint of workdir (default the latest), restored into the
  shardings the config asks for on this process's devices."""
  from jaxsd.diffusion import setup as build  # pylint: disable=g-import-not-at-top
  from jaxsd.checkpointing import checkpoints as checkpoint  # pylint: disable=g-import-not-at-top
  setup = build.TrainSetup(tiny_config(overrides))
  mngr = checkpoint.manager(workdir, read_only=True)
  try:
    state, _, step = setup.restore_train_state(mngr, step)
  finally:
    mngr.close()
  shardings = setup.state_shardings
  for x, s in zip(jax.tree_util.tree_leaves(state),
                  jax.tree_util.tree_leaves(shardings)):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
  return state, step


def run_train(job):
  from jaxsd.diffusion import task as diffusion_task  # pylint: disable=g-import-not-at-top
  hooks = []
  if job.get("sigterm_at"):  # SIGTERM after that step, as SLURM would
    process, step = job["sigterm_at"]
    hooks.append(helpers.sigterm_at_step(step, process))
  state = diffusion_task.train_and_evaluate(tiny_config(job.get("overrides")),
                                   job["workdir"], hooks=hooks)
  result = {"step": int(state.step), "devices": jax.device_count(),
            "processes": jax.process_count(), **sharded_fraction(state)}
  path = os.path.join(job["workdir"],
                      f"{job.get('tag', 'train')}_{jax.process_index()}.json")
  with open(path, "w") as f:
    json.dump(result, f)


def run_restore(job):
  state, step = restore_state(job["workdir"], job.get("overrides"),
                              job.get("step"))
  np.savez(job["out"], step=step, **{
      f"leaf_{i}": x for i, x in enumerate(state_leaves(state))})


def main():
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.use_absl_handler()  # timestamped lines
  logging.set_verbosity(logging.INFO)  # the log tells what a failed run did
  spec = json.loads(sys.argv[1])
  for job in spec.get("train", []):
    run_train(job)
  for job in spec.get("restore", []):
    run_restore(job)


if __name__ == "__main__":
  main()
