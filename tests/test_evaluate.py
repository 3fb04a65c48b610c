"""Evaluation during training and on saved checkpoints; skipped metrics."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxsd import metric_logging
from jaxsd.evaluation import evaluator as evaluator_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_metrics(workdir):
  from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
  client = MlflowClient(tracking_uri=metric_logging.tracking_uri(workdir))
  exp = client.get_experiment_by_name("jaxsd")
  (run,) = client.search_runs([exp.experiment_id])
  return client, run


def test_training_logs_eval_metrics(trained_run):
  workdir, _ = trained_run
  client, run = _run_metrics(workdir)
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


def test_metrics_without_weights_are_skipped(tiny_config, caplog):
  config = tiny_config()
  config.eval.metrics = ("fid_inception", "clip_score")
  config.eval.inception_weights = "/nonexistent/pt_inception.pth"
  config.eval.clip_model = "/nonexistent/clip"
  evaluator = evaluator_lib.Evaluator(config).prepare()
  images = np.zeros((4, 28, 28, 1), np.float32)
  out = evaluator.evaluate(images, ["a photograph of the number 1"] * 4)
  assert out == {}
  assert evaluator.metrics == ()
  assert "Skipping eval/fid_inception" in caplog.text
  assert "Skipping eval/clip_score" in caplog.text


def test_unknown_metric_is_an_error(tiny_config):
  config = tiny_config()
  config.eval.metrics = ("fid_mnist", "inception_score")
  with pytest.raises(ValueError, match="inception_score"):
    evaluator_lib.Evaluator(config)


def test_real_digits_score_as_real(tiny_config):
  """Real test images used as if generated: high accuracy, FID near 0."""
  from jaxsd import input_pipeline  # pylint: disable=g-import-not-at-top
  config = tiny_config()
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


def test_evaluate_cli_all_checkpoints(trained_run):
  workdir, _ = trained_run
  out = subprocess.run(
      [sys.executable, "-m", "jaxsd.evaluate", f"--workdir={workdir}",
       "--all_checkpoints", "--num_samples=20"],
      cwd=ROOT, capture_output=True, text=True, timeout=900)
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
  client, run = _run_metrics(workdir)
  steps = [m.step for m in client.get_metric_history(
      run.info.run_id, "eval/fid_mnist")]
  assert sorted(steps) == [2, 4, 4]  # training's eval at 4, then both again
