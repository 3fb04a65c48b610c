"""End to end: bf16-moment AdamW trains the tiny config and resumes
exactly; the run logs the state's bytes per parameter and XLA's plan of the
compiled step. Adafactor's state takes the same path (the trainer does not
depend on the optimiser): its checkpoint round trip and exact resume are
tested in tests/unit/test_optimizers.py, with bf16 AdamW's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.diffusion import task as diffusion_task

import helpers

import _parallel_worker as worker  # tests/e2e/ is on sys.path under pytest


@pytest.mark.mnist
@pytest.mark.parametrize("optimizer,moments", [("adamw", "bfloat16")])
def test_optimizer_trains_and_resumes_exactly(optimizer, moments,
                                              tiny_config, tmp_path):
  overrides = {"optim.optimizer": optimizer, "optim.moment_dtype": moments,
               # Only the end-of-run sample grid: evaluation is not what
               # this tests.
               "training.eval_every": 100, "eval.metrics": []}
  def config():
    c = tiny_config()
    c.update_from_flattened_dict(overrides)
    return c

  full = diffusion_task.train_and_evaluate(config(),
                                           str(tmp_path / "uninterrupted"))
  assert int(full.step) == 4
  # Resumed from the uninterrupted run's step-2 checkpoint (a copy of its
  # workdir without step 4): the optimiser state must restore exactly.
  # Stopping a run (SIGTERM at a step) is tested elsewhere; a third run
  # here would test it again.
  workdir = helpers.copy_run_until(str(tmp_path / "uninterrupted"),
                                   str(tmp_path / "resumed"), 2)
  resumed = diffusion_task.train_and_evaluate(config(), workdir)
  assert int(resumed.step) == 4
  helpers.assert_leaves_close(helpers.model_leaves(resumed),
                              helpers.model_leaves(full))
  helpers.assert_leaves_close(helpers.leaves(resumed.opt_state),
                              helpers.leaves(full.opt_state))
  # It trained: steps 3 and 4 moved the step-2 checkpoint's parameters.
  at_2, _ = worker.restore_state(str(tmp_path / "uninterrupted"), overrides,
                                 2)
  assert not all(np.array_equal(a, b) for a, b in
                 zip(helpers.model_leaves(at_2), helpers.model_leaves(full)))

  dtypes = {x.dtype for x in jax.tree_util.tree_leaves(full.opt_state)
            if x.ndim >= 2}
  if moments == "bfloat16":
    assert dtypes == {jnp.dtype(jnp.bfloat16)}

  _, runs = helpers.mlflow_runs(str(tmp_path / "uninterrupted"))
  metrics, params = runs[0].data.metrics, runs[0].data.params
  per_param = metrics["memory/optimizer_bytes_per_param"]
  assert 4.0 <= per_param < 4.1  # bf16 AdamW: 4 bytes (float32: 8)
  # XLA's plan of the compiled step, logged before step 1.
  for key in ("memory/step_peak_gb", "memory/step_temp_gb",
              "memory/step_argument_gb"):
    assert key in params and key in metrics, key
  assert 0 < metrics["memory/step_temp_gb"] < metrics["memory/step_peak_gb"]
