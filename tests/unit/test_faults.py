"""Faults an operator meets, each recovered or explained in one line: a
busy workdir, a resume with another architecture, a damaged or unwritable
checkpoint. The same faults in whole runs (SIGTERM, failed writes, bad
restarts of a trained run): tests/e2e/test_faults_runs.py.
"""
import errno
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxsd.checkpointing import checkpoints as checkpoint
from jaxsd import errors
from jaxsd import workdir_lock as lock_lib
from jaxsd.checkpointing import resume

import helpers

REPO = helpers.ROOT


# --- The workdir lock ---------------------------------------------------------

_HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from jaxsd import workdir_lock as lock_lib
lock = lock_lib.Lock({path!r})
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
      lock_lib.Lock(tmp_path).acquire()
    assert f"PID {holder.pid}" in str(e.value)
    assert os.uname().nodename in str(e.value)
  finally:
    holder.kill()  # as kill -9: the holder cleans nothing up
    holder.wait()
  # A dead holder leaves the lock free (the kernel dropped its flock).
  lock = lock_lib.Lock(tmp_path)
  lock.acquire()
  assert lock.holder()["pid"] == os.getpid()
  lock.release()
  assert not os.path.exists(lock.path)


def test_lock_without_flock_judges_the_holder_by_pid(tmp_path):
  holder = _hold_in_subprocess(tmp_path)
  try:
    with pytest.raises(errors.WorkdirBusyError, match=f"PID {holder.pid}"):
      lock_lib.Lock(tmp_path, use_flock=False).acquire()
  finally:
    holder.kill()
    holder.wait()
  # Its record stays (kill -9), but its PID is gone: stale, taken over.
  lock = lock_lib.Lock(tmp_path, use_flock=False)
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
  changed_fixed, changed_free = resume.config_changes(saved, new)
  dotted = key.replace("__", ".")
  assert [line.split(":")[0] for line in (changed_fixed if fixed
                                          else changed_free)] == [dotted]
  assert not (changed_free if fixed else changed_fixed)
  if fixed:
    with pytest.raises(errors.ResumeMismatchError) as e:
      resume.check_changes(saved, new, "runs/x", 4)
    assert dotted in str(e.value)
    assert "--workdir" in str(e.value) and "training.init_from" in str(e.value)
  else:
    resume.check_changes(saved, new, "runs/x", 4)


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


def _saved_run(workdir, steps=(2, 4)):
  mngr = checkpoint.manager(workdir, keep=3)
  for step in steps:
    checkpoint.save(mngr, step, _state(float(step)), {"step": step})
  return mngr


def test_damaged_latest_checkpoint_is_set_aside_and_the_previous_taken(
    tmp_path):
  from jaxsd.checkpointing import resume  # pylint: disable=g-import-not-at-top
  mngr = _saved_run(str(tmp_path))
  helpers.truncate_array_data(os.path.join(checkpoint.checkpoint_dir(tmp_path), "4"))
  abstract = _abstract(_state())
  state, _, step = resume.restore_newest_readable(
      mngr, lambda s: checkpoint.restore(mngr, abstract, s))
  assert step == 2
  np.testing.assert_array_equal(state["params"]["w"],
                                _state(2.0)["params"]["w"])
  ckpts = checkpoint.checkpoint_dir(tmp_path)
  assert sorted(os.listdir(ckpts)) == ["2", "4.corrupt"]  # never deleted
  assert mngr.all_steps() == [2]
  mngr.close()


def test_no_readable_checkpoint_stops_instead_of_starting_over(tmp_path):
  from jaxsd.checkpointing import resume  # pylint: disable=g-import-not-at-top
  mngr = _saved_run(str(tmp_path), steps=(2,))
  helpers.truncate_array_data(os.path.join(checkpoint.checkpoint_dir(tmp_path), "2"))
  abstract = _abstract(_state())
  with pytest.raises(errors.CheckpointError, match="rename them back"):
    resume.restore_newest_readable(
        mngr, lambda s: checkpoint.restore(mngr, abstract, s))
  mngr.close()


def test_sampling_a_damaged_checkpoint_names_it_and_the_readable_ones(
    tmp_path):
  _saved_run(str(tmp_path)).close()
  helpers.truncate_array_data(os.path.join(checkpoint.checkpoint_dir(tmp_path), "4"))
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


@pytest.mark.mnist
def test_a_second_training_process_is_refused_before_writing(tiny_config,
                                                             tmp_path):
  from jaxsd.diffusion import task as diffusion_task  # pylint: disable=g-import-not-at-top
  holder = _hold_in_subprocess(tmp_path)
  try:
    with pytest.raises(errors.WorkdirBusyError, match=f"PID {holder.pid}"):
      diffusion_task.train_and_evaluate(tiny_config(), str(tmp_path))
  finally:
    holder.kill()
    holder.wait()
  assert os.listdir(tmp_path) == [lock_lib.LOCK_FILE]  # the holder's
