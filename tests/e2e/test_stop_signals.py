"""Ctrl-C stops a run as SIGTERM does (a checkpoint of the newest state,
MLflow KILLED); a second Ctrl-C exits at once (130) leaving no partial
checkpoint folder; a resume the data cannot take is refused before the
workdir or the MLflow run are touched."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import helpers
from jaxsd import errors
from jaxsd.diffusion import task as diffusion_task

pytestmark = pytest.mark.mnist


def _ctrl_c_at(step: int):
  def hook(current: int):
    if current == step:
      os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C
  return hook


def test_ctrl_c_checkpoints_and_a_resume_with_other_data_is_refused_unwritten(
    tmp_path):
  workdir = str(tmp_path / "run")
  config = helpers.tiny_config({"training.num_steps": 4,
                                "training.checkpoint_every": 4})
  state = diffusion_task.train_and_evaluate(config, workdir,
                                            hooks=[_ctrl_c_at(2)])
  assert int(state.step) == 2
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
  assert helpers.mlflow_statuses(workdir) == ["KILLED"]

  with open(os.path.join(workdir, "config.json")) as f:
    saved = f.read()
  config = helpers.tiny_config({"training.num_steps": 4,
                                "training.batch_size": 16})
  with pytest.raises(errors.ResumeMismatchError,
                     match=r"global_batch_size=8, this run has 16 "
                           r"\(training.batch_size\)"):
    diffusion_task.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == saved
  assert json.loads(saved)["training"]["batch_size"] == 8
  assert helpers.mlflow_statuses(workdir) == ["KILLED"]
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]


_TWICE = """
import os, signal, sys, time
from jaxsd.training import preemption
checkpoints = sys.argv[1]
p = preemption.Preemption()
from jaxsd.checkpointing import checkpoints as checkpoint
p.on_abort.append(lambda: checkpoint.remove_partial_saves(checkpoints))
p.unsaved = True  # a save would be due: a single Ctrl-C waits for it
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.5)
assert p.requested, "the first Ctrl-C only asks the run to stop"
os.kill(os.getpid(), signal.SIGINT)
time.sleep(30)  # the watchdog ends the process before this
print("still running")
"""


def test_a_second_ctrl_c_exits_at_once_without_a_partial_checkpoint(tmp_path):
  checkpoints = tmp_path / "checkpoints"
  os.makedirs(checkpoints / "2" / "state")
  os.makedirs(checkpoints / "4.orbax-checkpoint-tmp-1765" / "state")
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(_TWICE),
                        str(checkpoints)], capture_output=True, text=True,
                       timeout=120, env={**os.environ,
                                         "PYTHONPATH": helpers.ROOT})
  assert out.returncode == 130, out.stderr[-2000:]
  assert "still running" not in out.stdout
  assert "Ctrl-C twice" in out.stderr
  assert os.listdir(checkpoints) == ["2"]
