"""Faults an operator meets, each recovered or explained in one line.

A busy workdir, a resume with another architecture, a damaged or unwritable
checkpoint, SIGTERM before the first step or during evaluation: the run
stops (or falls back) without damaging the run saved in the workdir, and the
MLflow record says how it ended.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxsd.checkpointing import checkpoints as checkpoint
from jaxsd import errors
from jaxsd.tracking import mlflow_store
from jaxsd.training import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- The workdir lock ---------------------------------------------------------

_HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from jaxsd.training import workdir
lock = workdir.Lock({path!r})
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def _hold_in_subprocess(path):
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER.format(
      repo=REPO, path=str(path))], stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_second_process_on_a_workdir_is_refused_naming_the_holder(tmp_path):
  holder = _hold_in_subprocess(tmp_path)
  try:
    with pytest.raises(errors.WorkdirBusyError) as e:
      workdir_lib.Lock(tmp_path).acquire()
    assert f"PID {holder.pid}" in str(e.value)
    assert os.uname().nodename in str(e.value)
  finally:
    holder.kill()  # as kill -9: the holder cleans nothing up
    holder.wait()
  # A dead holder leaves the lock free (the kernel dropped its flock).
  lock = workdir_lib.Lock(tmp_path)
  lock.acquire()
  assert lock.holder()["pid"] == os.getpid()
  lock.release()
  assert not os.path.exists(lock.path)


def test_lock_without_flock_judges_the_holder_by_pid(tmp_path):
  holder = _hold_in_subprocess(tmp_path)
  try:
    with pytest.raises(errors.WorkdirBusyError, match=f"PID {holder.pid}"):
      workdir_lib.Lock(tmp_path, use_flock=False).acquire()
  finally:
    holder.kill()
    holder.wait()
  # Its record stays (kill -9), but its PID is gone: stale, taken over.
  lock = workdir_lib.Lock(tmp_path, use_flock=False)
  assert lock.holder()["pid"] == holder.pid
  lock.acquire()
  assert lock.holder()["pid"] == os.getpid()
  lock.release()


# --- What a resume may change -------------------------------------------------


def _config_dict(tiny_config, **overrides):
  config = tiny_config()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return json.loads(config.to_json_best_effort())


@pytest.mark.parametrize("key,value,fixed", [
    ("model__block_out_channels", (64, 64), True),
    ("model__attention_head_dim", 8, True),
    ("text__hidden_size", 64, True),
    ("diffusion__prediction_type", "epsilon", True),
    ("optim__grad_clip_norm", 0.0, True),  # drops the clipping's state
    ("optim__grad_clip_norm", 0.5, False),  # only its value
    ("optim__learning_rate", 1e-4, False),
    ("training__num_steps", 100, False),
    ("training__eval_every", 2, False),
    ("sampling__num_steps", 8, False),
    ("model__dtype", "bfloat16", False),
    ("text__tokenizer", "/elsewhere/clip_tokenizer", False),
])
def test_resume_refuses_only_state_shaping_changes(tiny_config, key, value,
                                                   fixed):
  saved = _config_dict(tiny_config)
  new = _config_dict(tiny_config, **{key: value})
  changed_fixed, changed_free = workdir_lib.config_changes(saved, new)
  dotted = key.replace("__", ".")
  assert [line.split(":")[0] for line in (changed_fixed if fixed
                                          else changed_free)] == [dotted]
  assert not (changed_free if fixed else changed_fixed)
  if fixed:
    with pytest.raises(errors.ResumeMismatchError) as e:
      workdir_lib.check_resume(saved, new, "runs/x", 4)
    assert dotted in str(e.value)
    assert "--workdir" in str(e.value) and "training.init_from" in str(e.value)
  else:
    workdir_lib.check_resume(saved, new, "runs/x", 4)


# --- Damaged and unwritable checkpoints -------------------------------------


def _state(value=1.0):
  # Random: compressed, constant arrays would be too small to truncate.
  w = np.random.default_rng(int(value)).normal(size=(128, 128))
  return {"params": {"w": jnp.asarray(w, jnp.float32)},
          "ema_params": {"w": jnp.asarray(w + value, jnp.float32)}}


def _abstract(state):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      state)


def truncate_array_data(step_dir):
  """Halves the array data files of a checkpoint's state (what a crash of
  the file system, not of jaxsd, leaves)."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(
      os.path.join(step_dir, "state")) for f in fs]
  for data in (f for f in files if os.sep + "d" + os.sep in f):
    with open(data, "r+b") as f:
      f.truncate(os.path.getsize(data) // 2)


def _saved_run(workdir, steps=(2, 4)):
  mngr = checkpoint.manager(workdir, keep=3)
  for step in steps:
    checkpoint.save(mngr, step, _state(float(step)), {"step": step})
  return mngr


def test_damaged_latest_checkpoint_is_set_aside_and_the_previous_taken(
    tmp_path):
  from jaxsd.training import trainer as train  # pylint: disable=g-import-not-at-top
  mngr = _saved_run(str(tmp_path))
  truncate_array_data(os.path.join(checkpoint.checkpoint_dir(tmp_path), "4"))
  abstract = _abstract(_state())
  state, _, step = train.restore_newest_readable(
      mngr, lambda s: checkpoint.restore(mngr, abstract, s))
  assert step == 2
  np.testing.assert_array_equal(state["params"]["w"],
                                _state(2.0)["params"]["w"])
  ckpts = checkpoint.checkpoint_dir(tmp_path)
  assert sorted(os.listdir(ckpts)) == ["2", "4.corrupt"]  # never deleted
  assert mngr.all_steps() == [2]
  mngr.close()


def test_no_readable_checkpoint_stops_instead_of_starting_over(tmp_path):
  from jaxsd.training import trainer as train  # pylint: disable=g-import-not-at-top
  mngr = _saved_run(str(tmp_path), steps=(2,))
  truncate_array_data(os.path.join(checkpoint.checkpoint_dir(tmp_path), "2"))
  abstract = _abstract(_state())
  with pytest.raises(errors.CheckpointError, match="rename them back"):
    train.restore_newest_readable(
        mngr, lambda s: checkpoint.restore(mngr, abstract, s))
  mngr.close()


def test_sampling_a_damaged_checkpoint_names_it_and_the_readable_ones(
    tmp_path):
  _saved_run(str(tmp_path)).close()
  truncate_array_data(os.path.join(checkpoint.checkpoint_dir(tmp_path), "4"))
  abstract = _abstract(_state())["ema_params"]
  with pytest.raises(errors.CheckpointError) as e:
    checkpoint.restore_params(str(tmp_path), abstract)
  message = str(e.value)
  assert "step 4" in message and os.path.join("checkpoints", "4") in message
  assert "readable checkpoints: steps [2]" in message
  params, step = checkpoint.restore_params(str(tmp_path), abstract, step=2)
  assert step == 2
  np.testing.assert_array_equal(params["w"], _state(2.0)["ema_params"]["w"])


def _assert_failed_save_kept_the_previous(mngr, workdir, message):
  assert "step 4" in message and "last good checkpoint is step 2" in message
  assert checkpoint.checkpoint_dir(workdir) in message
  names = os.listdir(checkpoint.checkpoint_dir(workdir))
  assert names == ["2"], names  # the partial folder is gone
  mngr.reload()
  state, _, _ = checkpoint.restore(mngr, _abstract(_state()), 2)
  np.testing.assert_array_equal(state["params"]["w"],
                                _state(2.0)["params"]["w"])


def test_checkpoint_write_without_space_keeps_the_previous(tmp_path,
                                                           monkeypatch):
  mngr = _saved_run(str(tmp_path), steps=(2,))
  handler = ocp.JsonCheckpointHandler
  real = handler.async_save

  async def no_space(self, directory, *args, **kwargs):
    # The state is written by then: the partial folder holds real files.
    del args, kwargs
    assert ".orbax-checkpoint-tmp" in str(directory.parent)
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(handler, "async_save", no_space)
  with pytest.raises(errors.CheckpointError) as e:
    checkpoint.save(mngr, 4, _state(4.0), {"step": 4})
  monkeypatch.setattr(handler, "async_save", real)
  assert "no space left" in str(e.value)
  _assert_failed_save_kept_the_previous(mngr, str(tmp_path), str(e.value))
  mngr.close()


@pytest.fixture
def small_tmpfs(tmp_path):
  """A 2 MB tmpfs (needs mount rights: root outside a locked container)."""
  mount = tmp_path / "tmpfs"
  mount.mkdir()
  if shutil.which("mount") is None or subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
      capture_output=True, check=False).returncode != 0:
    pytest.skip("cannot mount a tmpfs here (needs root); the patched-writer "
                "test covers the same path")
  yield str(mount)
  subprocess.run(["umount", str(mount)], check=False)


def test_checkpoint_on_a_full_tmpfs_keeps_the_previous(small_tmpfs):
  workdir = os.path.join(small_tmpfs, "run")
  mngr = _saved_run(workdir, steps=(2,))
  # Leave less room than one more checkpoint needs.
  with open(os.path.join(small_tmpfs, "filler"), "wb") as f:
    free = shutil.disk_usage(small_tmpfs).free
    f.write(b"\0" * max(free - 4096, 0))
  with pytest.raises(errors.CheckpointError) as e:
    checkpoint.save(mngr, 4, _state(4.0), {"step": 4})
  os.remove(os.path.join(small_tmpfs, "filler"))
  assert "no space left" in str(e.value)
  _assert_failed_save_kept_the_previous(mngr, workdir, str(e.value))
  mngr.close()


# --- Whole runs (the tiny config) ---------------------------------------------


def _copy_run(trained_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_run[0], workdir)
  return workdir


def _mlflow_status(workdir):
  from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
  client = MlflowClient(tracking_uri=mlflow_store.tracking_uri(workdir))
  exp = client.get_experiment_by_name("jaxsd")
  return [r.info.status for r in client.search_runs([exp.experiment_id])]


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def _leaves(state):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(
      (state.params, state.ema_params))]


@pytest.fixture
def patient_watchdog(monkeypatch):
  """In-process runs: the SIGTERM watchdog must not end the test process."""
  from jaxsd.training import trainer as train  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(train._Preemption, "grace_s", 600.0)  # pylint: disable=protected-access


@pytest.mark.slow
@pytest.mark.mnist
@pytest.mark.parametrize("override,key", [
    ({"model": {"block_out_channels": (64, 64)}}, "model.block_out_channels"),
    ({"sampling": {"sampler": "foo"}}, "sampling.sampler"),
    ({"optim": {"learning_rate": -1.0}}, "optim.learning_rate"),
])
def test_a_bad_restart_leaves_the_run_intact(trained_run, tiny_config,
                                             tmp_path, override, key):
  from jaxsd.training import trainer as train  # pylint: disable=g-import-not-at-top
  workdir = _copy_run(trained_run, tmp_path)
  before = {name: _read(os.path.join(workdir, name))
            for name in ("config.json", "mlflow_run.txt")}
  config = tiny_config()
  for section, values in override.items():
    config[section].update(values)
  start = time.time()
  with pytest.raises(errors.JaxsdError) as e:
    train.train_and_evaluate(config, workdir)
  assert time.time() - start < 30  # before the model or the data are built
  assert key in str(e.value)
  for name, content in before.items():
    assert _read(os.path.join(workdir, name)) == content, name
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2",
                                                                      "4"]
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))
  assert _mlflow_status(workdir) == ["FINISHED"]


@pytest.mark.slow
@pytest.mark.mnist
def test_truncated_latest_checkpoint_sampling_names_it_training_falls_back(
    trained_run, tiny_config, tmp_path, patient_watchdog):
  from jaxsd.commands import sample
  from jaxsd.training import trainer as train  # pylint: disable=g-import-not-at-top
  workdir = _copy_run(trained_run, tmp_path)
  truncate_array_data(os.path.join(workdir, "checkpoints", "4"))
  with pytest.raises(errors.CheckpointError) as e:
    sample.generate_for_prompts(workdir, ["a photograph of the number 1"],
                                num_samples=1)
  assert "step 4" in str(e.value)
  assert "readable checkpoints: steps [2]" in str(e.value)
  # Training resumes from step 2 and ends as the uninterrupted run did.
  config = tiny_config()
  config.eval.metrics = ()
  state = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 4
  for a, b in zip(_leaves(state), _leaves(trained_run[1])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [
      "2", "4", "4.corrupt"]


@pytest.mark.slow
@pytest.mark.mnist
def test_init_from_starts_a_new_run_from_old_weights(trained_run, tiny_config,
                                                     tmp_path):
  from jaxsd.diffusion import setup as build
  from jaxsd.training import trainer as train  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.training.init_from = trained_run[0]
  config.optim.learning_rate = 1e-4  # the new run's optimiser may differ
  setup = build.TrainSetup(config)
  mngr = checkpoint.manager(str(tmp_path / "new"))
  state, step, _ = train.restore_or_create_state(setup, mngr,
                                                 jax.random.key(0), None)
  mngr.close()
  assert step == 0 and int(state.step) == 0
  for a, b in zip(_leaves(state), _leaves(trained_run[1])):
    np.testing.assert_array_equal(a, b)
  # Other parameter shapes cannot take them: the differing keys are named.
  config.model.block_out_channels = (32, 64)
  setup = build.TrainSetup(config)
  mngr = checkpoint.manager(str(tmp_path / "other"))
  with pytest.raises(errors.ConfigError,
                     match="training.init_from.*model.block_out_channels"):
    train.restore_or_create_state(setup, mngr, jax.random.key(0), None)
  mngr.close()


@pytest.mark.slow
@pytest.mark.mnist
def test_sigterm_before_the_first_step_stops_the_run_killed(
    trained_run, tiny_config, tmp_path, monkeypatch, patient_watchdog):
  from jaxsd.training import trainer as train  # pylint: disable=g-import-not-at-top
  workdir = _copy_run(trained_run, tmp_path)
  restore = train.restore_or_create_state

  def restore_then_sigterm(*args, **kwargs):
    out = restore(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    return out
  monkeypatch.setattr(train, "restore_or_create_state", restore_then_sigterm)
  config = tiny_config()
  config.training.num_steps = 6
  assert train.train_and_evaluate(config, workdir) is None
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2",
                                                                      "4"]
  assert _mlflow_status(workdir) == ["KILLED"]
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))


@pytest.mark.slow
@pytest.mark.mnist
def test_a_failed_checkpoint_write_ends_the_run_failed(
    trained_run, tiny_config, tmp_path, monkeypatch, patient_watchdog):
  from jaxsd.training import trainer as train  # pylint: disable=g-import-not-at-top
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
    train.train_and_evaluate(config, workdir)
  assert _mlflow_status(workdir) == ["FAILED"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2",
                                                                      "4"]
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))


@pytest.mark.mnist
def test_a_second_training_process_is_refused_before_writing(tiny_config,
                                                             tmp_path):
  from jaxsd.training import trainer as train  # pylint: disable=g-import-not-at-top
  holder = _hold_in_subprocess(tmp_path)
  try:
    with pytest.raises(errors.WorkdirBusyError, match=f"PID {holder.pid}"):
      train.train_and_evaluate(tiny_config(), str(tmp_path))
  finally:
    holder.kill()
    holder.wait()
  assert os.listdir(tmp_path) == [workdir_lib.LOCK_FILE]  # the holder's


def _jaxsd_main(workdir, *overrides, env=None, **popen):
  return subprocess.Popen(
      [sys.executable, "-m", "jaxsd.main", "--config=configs/tiny.py",
       f"--workdir={workdir}", *overrides], cwd=REPO, text=True,
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


@pytest.mark.slow
@pytest.mark.mnist
def test_sigterm_while_compiling_stops_within_seconds(tmp_path):
  # No persistent cache: the first step compiles for many seconds.
  proc = _jaxsd_main(tmp_path, "--config.eval.metrics=()",
                     env={"JAXSD_COMPILATION_CACHE": ""})
  rc, seconds, stderr = _sigterm_after(proc, "Training from step")
  assert rc == 0, stderr[-3000:]
  assert seconds < 20, stderr[-3000:]
  assert "Traceback" not in stderr
  assert os.listdir(tmp_path / "checkpoints") in ([], ["1"])
  assert _mlflow_status(str(tmp_path)) == ["KILLED"]
  assert not os.path.exists(tmp_path / workdir_lib.LOCK_FILE)


@pytest.mark.slow
@pytest.mark.mnist
def test_sigterm_during_evaluation_checkpoints_and_stops(tmp_path):
  # Step 2 evaluates but is not a checkpoint step: its state is new.
  proc = _jaxsd_main(tmp_path, "--config.training.checkpoint_every=4",
                     "--config.training.eval_every=2",
                     "--config.eval.metrics=('prompt_accuracy',)")
  rc, seconds, stderr = _sigterm_after(proc, "step 2/4")
  assert rc == 0, stderr[-3000:]
  assert seconds < 30, stderr[-3000:]
  assert os.listdir(tmp_path / "checkpoints") == ["2"]
  assert _mlflow_status(str(tmp_path)) == ["KILLED"]
  assert not os.path.exists(tmp_path / workdir_lib.LOCK_FILE)


@pytest.mark.slow
def test_cli_bad_value_is_one_line_in_seconds(tmp_path):
  workdir = tmp_path / "run"
  start = time.time()
  proc = _jaxsd_main(workdir, "--config.optim.learning_rate=-1")
  _, stderr = proc.communicate()
  assert proc.returncode == 1
  assert time.time() - start < 60  # imports; no model, no data
  assert "Traceback" not in stderr
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("jaxsd: error: optim.learning_rate=-1"), last
  assert not workdir.exists()
