"""The autoencoder trainer end to end on MNIST: a run checkpoints, logs
eval/psnr and its grid to MLflow, loads back (load_run) with the measured
scaling factor, resumes exactly after SIGTERM, and stops on a non-finite
loss keeping the last good checkpoint."""
import os

import numpy as np
import pytest

from jaxsd.autoencoder import training as at
from jaxsd.autoencoder import task as autoencoder_task
from jaxsd.data import pipeline as data_pipeline
from jaxsd.training import loop as loop_lib

import helpers

pytestmark = pytest.mark.mnist


def test_run_checkpoints_logs_and_loads(autoencoder_run, tiny_config):
  workdir, whole = autoencoder_run
  assert int(whole.step) == 4
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2",
                                                                      "4"]
  assert os.path.exists(os.path.join(workdir, "samples",
                                     "recon_step_00000004.png"))
  client, run = helpers.mlflow_run(workdir)
  assert run.info.status == "FINISHED"
  psnr = run.data.metrics["eval/psnr"]
  assert np.isfinite(psnr) and psnr > 0
  assert "eval/rfid" not in run.data.metrics  # no Inception weights offline
  assert "train/d_loss" in run.data.metrics
  assert [a.path for a in client.list_artifacts(run.info.run_id)
          if a.path == "reconstructions"] == ["reconstructions"]

  # load_run: the measured scaling factor and params reproducing eval/psnr.
  assert at.is_autoencoder_run(workdir)
  ae_config, params, step = at.load_run(workdir)
  assert step == 4
  assert ae_config.scaling_factor == pytest.approx(
      run.data.metrics["autoencoder/scaling_factor"], rel=1e-6)
  assert ae_config.scaling_factor > 0 and ae_config.in_channels == 1
  config = helpers.small_autoencoder(tiny_config())
  heldout = data_pipeline.preview(
      config, data_pipeline.make_source(config, config.eval.reference_split),
      config.autoencoder.eval_images)[0]
  reconstruct = at.make_reconstruct_fn(at.ae_lib.AutoencoderKL(ae_config))
  recon, _ = reconstruct(params, heldout)
  assert at.psnr(heldout, recon) == pytest.approx(psnr, abs=1e-4)
  _, params_2, _ = at.load_run(workdir, step=2)
  assert not helpers.same_leaves(params_2, params)


def test_sigterm_then_restart_ends_as_the_uninterrupted_run(
    autoencoder_run, autoencoder_config, tmp_path, monkeypatch):
  monkeypatch.setenv("JAXSD_OFFLINE", "1")  # no download try for rFID
  _, whole = autoencoder_run
  workdir = str(tmp_path / "resumed")
  # SIGTERM at step 2 checkpoints and stops; the restart ends as `whole`.
  stopped = autoencoder_task.train_autoencoder(
      autoencoder_config(), workdir, hooks=[helpers.sigterm_at_step(2)])
  assert int(stopped.step) == 2
  assert helpers.mlflow_run(workdir)[1].info.status == "KILLED"
  resumed = autoencoder_task.train_autoencoder(autoencoder_config(), workdir)
  assert int(resumed.step) == 4
  helpers.assert_leaves_close(resumed.params, whole.params)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
    autoencoder_config, tmp_path, monkeypatch):
  monkeypatch.setenv("JAXSD_OFFLINE", "1")
  real = at.AutoencoderSetup.global_batch
  calls = []

  def poisoned(self, local_batch):
    calls.append(1)
    if len(calls) == 3:  # the batch of step 3
      local_batch = {"image": np.full_like(local_batch["image"], np.nan)}
    return real(self, local_batch)
  monkeypatch.setattr(at.AutoencoderSetup, "global_batch", poisoned)
  workdir = str(tmp_path / "nan")
  with pytest.raises(loop_lib.NonFiniteLossError, match="step 3"):
    autoencoder_task.train_autoencoder(autoencoder_config(), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  assert helpers.mlflow_run(workdir)[1].info.status == "FAILED"
  assert at.load_run(workdir)[2] == 2
