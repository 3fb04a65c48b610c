"""Evaluation with the trained MNIST classifier (a fresh cache trains it):
during training, on real digits, and on every saved checkpoint through the
jaxsd-evaluate command. A test that writes into the trained run copies its
workdir first: the run is a session fixture other tests read.
"""
import json
import os
import shutil

import numpy as np
import pytest

from jaxsd import environment
from jaxsd.evaluation import evaluator as evaluator_lib

import helpers

pytestmark = pytest.mark.mnist


def test_training_logs_eval_metrics(trained_run):
  workdir, _ = trained_run
  client, run = helpers.mlflow_run(workdir)
  for name in ("prompt_accuracy", "fid_mnist", "diversity", "seconds",
               "prompt_accuracy/3", "diversity/9"):
    history = client.get_metric_history(run.info.run_id, f"eval/{name}")
    assert [m.step for m in history] == [4], name
    assert np.isfinite(history[0].value)
  acc = run.data.metrics["eval/prompt_accuracy"]
  assert 0.0 <= acc <= 1.0 and run.data.metrics["eval/fid_mnist"] > 0
  # Not configured for the tiny run: nothing logged.
  assert "eval/clip_score" not in run.data.metrics
  assert "eval/fid_inception" not in run.data.metrics



def test_real_digits_score_as_real(tiny_config):
  """Real test images used as if generated: high accuracy, FID near 0."""
  from jaxsd.data import mnist as input_pipeline  # pylint: disable=g-import-not-at-top
  config = environment.resolve(tiny_config())
  evaluator = evaluator_lib.Evaluator(config).prepare()
  images, labels = input_pipeline.load_mnist(config.data, "test")
  images = images[:2000].astype(np.float32) / 127.5 - 1
  prompts = [f"a photograph of the number {d}" for d in labels[:2000]]
  out = evaluator.evaluate(images, prompts)
  assert out["prompt_accuracy"] >= 0.99
  noise = np.random.default_rng(0).uniform(-1, 1, images.shape)
  noise_out = evaluator.evaluate(noise.astype(np.float32), prompts)
  assert out["fid_mnist"] < 0.05 * noise_out["fid_mnist"]
  assert noise_out["prompt_accuracy"] < 0.5
  # Padded to 32x32 as the data pipeline pads: judged on the same digits.
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)),
                  constant_values=-1.0)
  padded_out = evaluator.evaluate(padded, prompts)
  for name in ("prompt_accuracy", "fid_mnist", "diversity", "diversity/3"):
    assert padded_out[name] == out[name], name
  with pytest.raises(ValueError, match="28x28 or 32x32"):
    evaluator.evaluate(np.zeros((10, 64, 64, 1), np.float32), prompts[:10])



def test_evaluate_cli_all_checkpoints(trained_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_run[0], workdir)
  out = helpers.jaxsd_command(
      "jaxsd.commands.evaluate", f"--workdir={workdir}", "--all_checkpoints",
      "--num_samples=20", timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in out.stdout.splitlines()
          if line.startswith("{")]
  assert [r["step"] for r in rows] == [2, 4]
  for r in rows:
    assert {"prompt_accuracy", "fid_mnist", "diversity", "seconds"} <= set(r)
  table = open(os.path.join(workdir, "eval", "checkpoints.md")).read()
  assert table.startswith("| step | prompt_accuracy | fid_mnist |")
  assert len(table.strip().splitlines()) == 4
  assert os.path.exists(os.path.join(workdir, "eval", "checkpoints.csv"))
  client, run = helpers.mlflow_run(workdir)
  steps = [m.step for m in client.get_metric_history(
      run.info.run_id, "eval/fid_mnist")]
  assert sorted(steps) == [2, 4, 4]  # training's eval at 4, then both again
