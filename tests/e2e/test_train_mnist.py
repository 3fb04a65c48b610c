"""End to end: the tiny config trains, checkpoints, logs, samples, resumes.

These share one compiled step through the persistent compilation cache, so
only the first run pays for compiling.
"""
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxsd.tracking import mlflow_store
from jaxsd.commands import plot_runs
from jaxsd.training import trainer as train
from jaxsd.data import pipeline as data_pipeline

pytestmark = pytest.mark.slow


def _config(tiny_config, **training):
  config = tiny_config()
  config.training.update(training)
  return config


def _mlflow_runs(workdir):
  from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
  client = MlflowClient(tracking_uri=mlflow_store.tracking_uri(workdir))
  exp = client.get_experiment_by_name("jaxsd")
  return client, client.search_runs([exp.experiment_id])


def _leaves(state):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(
      (state.params, state.ema_params))]


@pytest.fixture(scope="module")
def uninterrupted(trained_run):
  workdir, state = trained_run
  return workdir, _leaves(state)


@pytest.mark.mnist
def test_run_writes_checkpoints_metrics_and_samples(uninterrupted):
  workdir, _ = uninterrupted
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert os.path.exists(os.path.join(workdir, "samples", "step_00000004.png"))
  assert os.path.exists(os.path.join(workdir, train.CONFIG_FILE))
  client, runs = _mlflow_runs(workdir)
  assert len(runs) == 1
  run = runs[0]
  assert run.info.status == "FINISHED"
  assert run.data.params["training.batch_size"] == "8"
  assert run.data.params["diffusion.schedule"] == "cosine"
  history = client.get_metric_history(run.info.run_id, "train/loss")
  assert [m.step for m in history] == [2, 4]
  assert all(np.isfinite(m.value) for m in history)
  for key in ("train/learning_rate", "train/grad_norm",
              "system/steps_per_second", "system/memory_gb",
              "system/eta_seconds", "system/train_seconds",
              "system/data_wait_percent", "model/params_trainable",
              "data/batches_per_epoch", "data/skipped"):
    assert key in run.data.metrics, key
  # What the run logged of its data: MNIST train, batches of 8.
  assert run.data.metrics["data/examples"] == 60000
  assert run.data.metrics["data/batches_per_epoch"] == 7500
  assert "data/examples" in [a.path for a in client.list_artifacts(
      run.info.run_id, "data")]
  artifacts = [a.path for a in client.list_artifacts(run.info.run_id,
                                                     "samples")]
  assert artifacts == ["samples/step_00000004.png"]


@pytest.mark.mnist
def test_preempted_run_resumes_to_identical_parameters(
    uninterrupted, tiny_config, tmp_path, monkeypatch):
  _, expected = uninterrupted
  workdir = str(tmp_path)
  reached = train._Preemption.reached

  def sigterm_at_step_2(self, step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)  # as SLURM does on preemption
    return reached(self, step)

  monkeypatch.setattr(train._Preemption, "reached", sigterm_at_step_2)
  stopped = train.train_and_evaluate(_config(tiny_config), workdir)
  assert int(stopped.step) == 2
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
  monkeypatch.setattr(train._Preemption, "reached", reached)

  resumed = train.train_and_evaluate(_config(tiny_config), workdir)
  assert int(resumed.step) == 4
  for a, b in zip(_leaves(resumed), expected):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  client, runs = _mlflow_runs(workdir)
  assert len(runs) == 1  # the resumed run logs into the same MLflow run
  steps = [m.step for m in client.get_metric_history(runs[0].info.run_id,
                                                     "train/loss")]
  assert steps == [2, 4]
  # Training time carries over the restart (saved in the checkpoint).
  seconds = [m.value for m in client.get_metric_history(
      runs[0].info.run_id, "system/train_seconds")]
  assert len(seconds) == 2 and 0 < seconds[0] < seconds[1]


@pytest.mark.mnist
def test_plot_runs_draws_eval_metrics_against_training_minutes(
    uninterrupted, tmp_path):
  workdir, _ = uninterrupted
  hist = plot_runs.run_histories(workdir, [plot_runs.TIME_KEY,
                                           "eval/prompt_accuracy"])
  # The run's one periodic evaluation (no test writes into trained_run).
  assert [s for s, _ in hist["eval/prompt_accuracy"]] == [4]
  minutes = plot_runs.minutes_at([4], hist[plot_runs.TIME_KEY])
  assert minutes[0] == pytest.approx(hist[plot_runs.TIME_KEY][-1][1] / 60)
  out = str(tmp_path / "progress.png")
  plot_runs.plot([workdir, workdir], ["a", "b"],
                 ["eval/prompt_accuracy", "eval/fid_mnist"], out)
  assert os.path.getsize(out) > 10_000
  with pytest.raises(FileNotFoundError, match="not a training workdir"):
    plot_runs.run_histories(str(tmp_path), ["eval/fid_mnist"])


@pytest.mark.mnist
def test_nonfinite_loss_stops_without_checkpoint(tiny_config, tmp_path,
                                                 monkeypatch):
  original = data_pipeline.next_model_batch

  def poisoned(loader, steps=1):
    batch = original(loader, steps)
    if loader.position == 3:  # the batch of step 3
      batch["image"] = batch["image"] * np.nan
    return batch

  monkeypatch.setattr(data_pipeline, "next_model_batch", poisoned)
  config = _config(tiny_config, checkpoint_every=1, log_every=1)
  with pytest.raises(train.NonFiniteLossError, match="at step 3"):
    train.train_and_evaluate(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
  _, runs = _mlflow_runs(str(tmp_path))
  assert runs[0].info.status == "FAILED"


def _cli(*args, workdir):
  return subprocess.run(
      [sys.executable, "-m", "jaxsd.main", "--config=configs/tiny.py",
       f"--workdir={workdir}", *args],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      capture_output=True, text=True, timeout=600)


def test_cli_unknown_config_key_is_named(tmp_path):
  out = _cli("--config.training.num_stepz=3", workdir=tmp_path)
  assert out.returncode != 0
  assert "num_stepz" in out.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_cli_batch_not_divisible_by_devices(tmp_path):
  # parallel.cpu_devices splits the CPU into 3 devices before JAX starts.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
      [sys.executable, "-m", "jaxsd.main", "--config=configs/tiny.py",
       f"--workdir={tmp_path}", "--config.training.batch_size=8",
       "--config.parallel.cpu_devices=3"],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      capture_output=True, text=True, timeout=600, env=env)
  assert out.returncode != 0
  assert "training.batch_size=8 must be divisible by the device count (3)" in (
      out.stderr)
