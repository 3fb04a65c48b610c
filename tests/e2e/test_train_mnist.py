"""End to end: the tiny config trains, checkpoints, logs, samples, resumes.

These share one compiled step through the persistent compilation cache, so
only the first run pays for compiling.
"""
import os

import numpy as np
import pytest

from jaxsd.tracking import plots as plot_runs
from jaxsd.data import pipeline as data_pipeline
from jaxsd.diffusion import task as diffusion_task
from jaxsd.training import loop as loop_lib
from jaxsd.checkpointing import run_config

import helpers

@pytest.fixture(scope="module")
def uninterrupted(trained_run):
  workdir, state = trained_run
  return workdir, helpers.model_leaves(state)


@pytest.mark.mnist
def test_run_writes_checkpoints_metrics_and_samples(uninterrupted):
  workdir, _ = uninterrupted
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert os.path.exists(os.path.join(workdir, "samples", "step_00000004.png"))
  assert os.path.exists(os.path.join(workdir, run_config.CONFIG_FILE))
  client, runs = helpers.mlflow_runs(workdir)
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
    uninterrupted, tiny_config, tmp_path):
  _, expected = uninterrupted
  workdir = str(tmp_path)
  stopped = diffusion_task.train_and_evaluate(tiny_config(), workdir,
                                     hooks=[helpers.sigterm_at_step(2)])
  assert int(stopped.step) == 2
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]

  resumed = diffusion_task.train_and_evaluate(tiny_config(), workdir)
  assert int(resumed.step) == 4
  helpers.assert_leaves_close(helpers.model_leaves(resumed), expected)
  client, runs = helpers.mlflow_runs(workdir)
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
  config = tiny_config()
  config.training.update(checkpoint_every=1, log_every=1)
  with pytest.raises(loop_lib.NonFiniteLossError, match="at step 3"):
    diffusion_task.train_and_evaluate(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
  _, runs = helpers.mlflow_runs(str(tmp_path))
  assert runs[0].info.status == "FAILED"
