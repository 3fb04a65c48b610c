"""Faults in whole runs of the tiny config, each recovered or explained in
one line: a bad restart of a trained run, a truncated latest checkpoint,
init_from, SIGTERM before the first step, while compiling or during
evaluation, a failed checkpoint write. The run stops (or falls back)
without damaging the run saved in the workdir, and the MLflow record says
how it ended."""
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import pytest

from jaxsd import errors
from jaxsd.checkpointing import checkpoints as checkpoint
from jaxsd import workdir_lock as lock_lib
from jaxsd import xla_flags

import helpers

pytestmark = pytest.mark.mnist


def _copy_run(trained_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_run[0], workdir)
  return workdir


def _read(path):
  with open(path, "rb") as f:
    return f.read()


@pytest.fixture
def patient_watchdog(monkeypatch):
  """In-process runs: the SIGTERM watchdog must not end the test process."""
  from jaxsd.training import preemption as preemption_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(preemption_lib.Preemption, "grace_s", 600.0)  # pylint: disable=protected-access


@pytest.mark.parametrize("override,key", [
    ({"model": {"block_out_channels": (64, 64)}}, "model.block_out_channels"),
    ({"sampling": {"sampler": "foo"}}, "sampling.sampler"),
    ({"optim": {"learning_rate": -1.0}}, "optim.learning_rate"),
])
def test_a_bad_restart_leaves_the_run_intact(trained_run, tiny_config,
                                             tmp_path, override, key):
  from jaxsd.diffusion import task as diffusion_task  # pylint: disable=g-import-not-at-top
  workdir = _copy_run(trained_run, tmp_path)
  before = {name: _read(os.path.join(workdir, name))
            for name in ("config.json", "mlflow_run.txt")}
  config = tiny_config()
  for section, values in override.items():
    config[section].update(values)
  start = time.time()
  with pytest.raises(errors.JaxsdError) as e:
    diffusion_task.train_and_evaluate(config, workdir)
  assert time.time() - start < 30  # before the model or the data are built
  assert key in str(e.value)
  for name, content in before.items():
    assert _read(os.path.join(workdir, name)) == content, name
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2",
                                                                      "4"]
  assert not os.path.exists(os.path.join(workdir, lock_lib.LOCK_FILE))
  assert helpers.mlflow_statuses(workdir) == ["FINISHED"]


def test_truncated_latest_checkpoint_sampling_names_it_training_falls_back(
    trained_run, tiny_config, tmp_path, patient_watchdog):
  from jaxsd.diffusion import sample_run as sample
  from jaxsd.diffusion import task as diffusion_task  # pylint: disable=g-import-not-at-top
  workdir = _copy_run(trained_run, tmp_path)
  helpers.truncate_array_data(os.path.join(workdir, "checkpoints", "4"))
  with pytest.raises(errors.CheckpointError) as e:
    sample.generate_for_prompts(workdir, ["a photograph of the number 1"],
                                num_samples=1)
  assert "step 4" in str(e.value)
  assert "readable checkpoints: steps [2]" in str(e.value)
  # Training resumes from step 2 and ends as the uninterrupted run did.
  config = tiny_config()
  config.eval.metrics = ()
  state = diffusion_task.train_and_evaluate(config, workdir)
  assert int(state.step) == 4
  helpers.assert_leaves_close(helpers.model_leaves(state),
                              helpers.model_leaves(trained_run[1]))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [
      "2", "4", "4.corrupt"]


def test_init_from_starts_a_new_run_from_old_weights(trained_run, tiny_config,
                                                     tmp_path):
  from jaxsd.diffusion import setup as build  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import task as diffusion_task  # pylint: disable=g-import-not-at-top
  from jaxsd.training import trainer  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.training.init_from = trained_run[0]
  config.optim.learning_rate = 1e-4  # the new run's optimiser may differ
  setup = build.TrainSetup(config)
  mngr = checkpoint.manager(str(tmp_path / "new"))
  state, step, _ = trainer.restore_or_create_state(
      diffusion_task.DiffusionTask(), setup, mngr,
                                                 jax.random.key(0), None)
  mngr.close()
  assert step == 0 and int(state.step) == 0
  helpers.assert_leaves_close(helpers.model_leaves(state),
                              helpers.model_leaves(trained_run[1]), 0, 0)
  # Other parameter shapes cannot take them: the differing keys are named.
  config.model.block_out_channels = (32, 64)
  setup = build.TrainSetup(config)
  mngr = checkpoint.manager(str(tmp_path / "other"))
  with pytest.raises(errors.ConfigError,
                     match="training.init_from.*model.block_out_channels"):
    trainer.restore_or_create_state(
      diffusion_task.DiffusionTask(), setup, mngr, jax.random.key(0), None)
  mngr.close()


def test_sigterm_before_the_first_step_stops_the_run_killed(
    trained_run, tiny_config, tmp_path, monkeypatch, patient_watchdog):
  from jaxsd.diffusion import task as diffusion_task  # pylint: disable=g-import-not-at-top
  from jaxsd.training import trainer  # pylint: disable=g-import-not-at-top
  workdir = _copy_run(trained_run, tmp_path)
  restore = trainer.restore_or_create_state

  def restore_then_sigterm(*args, **kwargs):
    out = restore(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    return out
  monkeypatch.setattr(trainer, "restore_or_create_state", restore_then_sigterm)
  config = tiny_config()
  config.training.num_steps = 6
  assert diffusion_task.train_and_evaluate(config, workdir) is None
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2",
                                                                      "4"]
  assert helpers.mlflow_statuses(workdir) == ["KILLED"]
  assert not os.path.exists(os.path.join(workdir, lock_lib.LOCK_FILE))


def test_a_failed_checkpoint_write_ends_the_run_failed(
    trained_run, tiny_config, tmp_path, monkeypatch, patient_watchdog):
  from jaxsd.diffusion import task as diffusion_task  # pylint: disable=g-import-not-at-top
  workdir = _copy_run(trained_run, tmp_path)
  save = checkpoint.save

  def no_space_at_6(mngr, step, state, meta):
    if step == 6:
      raise errors.CheckpointError("no space left (test)")
    return save(mngr, step, state, meta)
  monkeypatch.setattr(checkpoint, "save", no_space_at_6)
  config = tiny_config()
  config.training.num_steps = 6
  config.eval.metrics = ()
  with pytest.raises(errors.CheckpointError):
    diffusion_task.train_and_evaluate(config, workdir)
  assert helpers.mlflow_statuses(workdir) == ["FAILED"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2",
                                                                      "4"]
  assert not os.path.exists(os.path.join(workdir, lock_lib.LOCK_FILE))




def _jaxsd_main(workdir, *overrides, env=None, **popen):
  return subprocess.Popen(
      [sys.executable, "-m", "jaxsd.main", "--config=configs/tiny.py",
       f"--workdir={workdir}", *overrides], cwd=helpers.ROOT, text=True,
      env=dict(os.environ, **(env or {})), stderr=subprocess.PIPE, **popen)


def _sigterm_after(proc, trigger: str, delay: float = 0.5):
  """SIGTERM `delay` s after `trigger` shows in stderr; (exit code,
  seconds from the signal to the exit, stderr after it)."""
  for line in proc.stderr:
    if trigger in line:
      break
  else:
    proc.wait()
    raise AssertionError(f"{trigger!r} never showed; rc {proc.returncode}")
  time.sleep(delay)
  proc.send_signal(signal.SIGTERM)
  sent = time.time()
  rest = proc.stderr.read()
  return proc.wait(), time.time() - sent, rest


def test_sigterm_while_compiling_stops_within_seconds(tmp_path):
  # No persistent cache and XLA's optimisations on: the first step compiles
  # for many seconds. XLA's own emitters, as a user's run has them (the
  # tests' LLVM emitters, tests/conftest.py, take longer here).
  flags = xla_flags.without_flag(os.environ.get("XLA_FLAGS", ""),
                                 xla_flags.FAST_COMPILE_FLAG)
  proc = _jaxsd_main(tmp_path, "--config.eval.metrics=()",
                     env={"JAXSD_COMPILATION_CACHE": "",
                          "JAX_COMPILATION_CACHE_DIR": "",
                          "JAX_DISABLE_MOST_OPTIMIZATIONS": "0",
                          "XLA_FLAGS": flags})
  rc, seconds, stderr = _sigterm_after(proc, "Training from step")
  assert rc == 0, stderr[-3000:]
  assert seconds < 20, stderr[-3000:]
  assert "Traceback" not in stderr
  assert os.listdir(tmp_path / "checkpoints") in ([], ["1"])
  assert helpers.mlflow_statuses(str(tmp_path)) == ["KILLED"]
  assert not os.path.exists(tmp_path / lock_lib.LOCK_FILE)


def test_sigterm_during_evaluation_checkpoints_and_stops(tmp_path):
  # Step 2 evaluates but is not a checkpoint step: its state is new.
  proc = _jaxsd_main(tmp_path, "--config.training.checkpoint_every=4",
                     "--config.training.eval_every=2",
                     "--config.eval.metrics=('prompt_accuracy',)")
  rc, seconds, stderr = _sigterm_after(proc, "step 2/4")
  assert rc == 0, stderr[-3000:]
  assert seconds < 30, stderr[-3000:]
  assert os.listdir(tmp_path / "checkpoints") == ["2"]
  assert helpers.mlflow_statuses(str(tmp_path)) == ["KILLED"]
  assert not os.path.exists(tmp_path / lock_lib.LOCK_FILE)
