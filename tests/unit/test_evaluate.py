"""Evaluation during training and on saved checkpoints; the metric registry.

Tests that write into a trained run copy its workdir first: the run is a
session fixture other tests read. Tests that need the trained MNIST
classifier (a fresh cache trains it) or start a CLI are slow; the registry
and skipping are tested with a stand-in classifier.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxsd import environment
from jaxsd.tracking import mlflow_store
from jaxsd.evaluation import evaluator as evaluator_lib
from jaxsd.evaluation import fid
from jaxsd.evaluation import prompt_metrics
from jaxsd.evaluation.metrics import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_metrics(workdir):
  from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
  client = MlflowClient(tracking_uri=mlflow_store.tracking_uri(workdir))
  exp = client.get_experiment_by_name("jaxsd")
  (run,) = client.search_runs([exp.experiment_id])
  return client, run


@pytest.mark.mnist
@pytest.mark.slow
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
  config = environment.resolve(tiny_config())
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
  with pytest.raises(ValueError, match="inception_score") as info:
    evaluator_lib.Evaluator(config)
  for name in evaluator_lib.metric_names():
    assert name in str(info.value)
  assert {"prompt_accuracy", "fid_mnist", "diversity", "fid_inception",
          "clip_score"} <= set(evaluator_lib.metric_names())


@pytest.mark.mnist
@pytest.mark.slow
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


@pytest.mark.mnist
@pytest.mark.slow
def test_evaluate_cli_all_checkpoints(trained_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_run[0], workdir)
  out = subprocess.run(
      [sys.executable, "-m", "jaxsd.commands.evaluate", f"--workdir={workdir}",
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


# --- The registry, with a stand-in classifier -------------------------------


class _CountingClassifier:
  """Deterministic logits and features of the input pixels; counts passes."""
  identity = "stand-in-classifier"

  def __init__(self):
    self.sample_passes = 0
    rng = np.random.RandomState(0)
    self._w = rng.randn(28 * 28, 10 + 16).astype(np.float32)

  def logits_and_features(self, images, batch_size=500):
    from jaxsd.evaluation import classifier as classifier_lib  # pylint: disable=g-import-not-at-top
    x = classifier_lib.as_model_input(images).reshape(len(images), -1)
    out = x @ self._w
    if len(images) == 60:  # the sample set, not MNIST
      self.sample_passes += 1
    return out[:, :10], np.maximum(out[:, 10:], 0)

  def features(self, images, batch_size=500):
    return self.logits_and_features(images, batch_size)[1]


def _stand_in_evaluator(tiny_config, tmp_path, metrics):
  config = environment.resolve(tiny_config())
  config.eval.metrics = metrics
  config.eval.cache_dir = str(tmp_path)
  evaluator = evaluator_lib.Evaluator(config)
  ctx = evaluator.context
  ctx._classifier = _CountingClassifier()  # pylint: disable=protected-access
  real = np.random.RandomState(1)
  mnist_test = (real.randint(0, 256, (200, 28, 28, 1), np.uint8),
                np.arange(200, dtype=np.int32) % 10)
  ctx.mnist = lambda split: mnist_test
  return evaluator, mnist_test


def _samples():
  rng = np.random.RandomState(2)
  images = rng.uniform(-1, 1, (60, 28, 28, 1)).astype(np.float32)
  prompts = [f"a photograph of the number {i % 10}" for i in range(60)]
  return images, prompts


def test_classifier_metrics_share_one_pass_and_match_library(tiny_config,
                                                             tmp_path):
  """The three classifier metrics run the classifier once per sample set, and
  give what prompt_metrics computes directly."""
  evaluator, (real_images, real_labels) = _stand_in_evaluator(
      tiny_config, tmp_path, ("prompt_accuracy", "fid_mnist", "diversity"))
  evaluator.prepare()
  images, prompts = _samples()
  out = evaluator.evaluate(images, prompts)
  clf = evaluator.context.classifier()
  assert clf.sample_passes == 1
  evaluator.evaluate(images, prompts)
  assert clf.sample_passes == 2  # a new evaluation is a new sample set

  digits = prompt_metrics.prompt_digits_of(prompts)
  reference = fid.feature_statistics(clf.features(real_images))
  expected = prompt_metrics.sample_metrics(clf, images, digits, reference)
  expected["fid_mnist"] = expected.pop("mnist_fid")
  for name, value in expected.items():
    assert out[name] == value, name
  real = prompt_metrics.diversity(clf.features(real_images), real_labels)
  for d in range(10):
    assert out[f"diversity_ratio/{d}"] == pytest.approx(
        out[f"diversity/{d}"] / real["per_digit"][d], rel=1e-12)
  assert out["diversity_ratio_min"] == min(
      out[f"diversity_ratio/{d}"] for d in range(10))
  assert out["prompt_accuracy_min"] == min(
      out[f"prompt_accuracy/{d}"] for d in range(10))
  assert {f"seconds/{m}" for m in ("prompt_accuracy", "fid_mnist",
                                   "diversity", "mnist_classifier")} <= set(out)
  # Only what is configured is reported.
  only, _ = _stand_in_evaluator(tiny_config, tmp_path, ("prompt_accuracy",))
  assert not any(k.startswith(("diversity", "fid")) for k in
                 only.evaluate(images, prompts))


def test_a_registered_metric_needs_no_evaluator_change(tiny_config, tmp_path):
  @registry.register_metric("mean_brightness")
  class MeanBrightness(registry.Metric):  # pylint: disable=unused-variable
    prepared = 0

    def prepare(self, ctx):
      type(self).prepared += 1

    def __call__(self, images, prompts, ctx):
      return {"mean_brightness": float(images.mean())}

  try:
    assert "mean_brightness" in evaluator_lib.metric_names()
    evaluator, _ = _stand_in_evaluator(tiny_config, tmp_path,
                                       ("mean_brightness",))
    images, prompts = _samples()
    out = evaluator.prepare().evaluate(images, prompts)
    evaluator.evaluate(images, prompts)
    assert MeanBrightness.prepared == 1
    assert out["mean_brightness"] == float(images.mean())
    assert set(out) == {"mean_brightness", "seconds/mean_brightness"}
    assert evaluator.context.classifier().sample_passes == 0
    with pytest.raises(ValueError, match="already registered"):
      registry.register_metric("mean_brightness")(MeanBrightness)
  finally:
    registry._METRICS.unregister("mean_brightness")  # pylint: disable=protected-access


def _captioned_folder(path, count=5):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(path)
  with open(os.path.join(path, "metadata.jsonl"), "w") as f:
    for i in range(count):
      Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(
          os.path.join(path, f"{i}.png"))
      f.write(json.dumps({"file_name": f"{i}.png",
                          "text": f"picture {i}"}) + "\n")
  return path


def test_evaluation_beyond_mnist_uses_the_datas_prompts_and_images(
    tiny_config, tmp_path):
  config = tiny_config()
  config.data.source = "imagefolder"
  config.data.path = _captioned_folder(str(tmp_path / "images"))
  config.data.num_channels = 3
  # The MNIST classifier's metrics cannot judge these images.
  with pytest.raises(ValueError, match=r"prompt_accuracy.*data.source="):
    evaluator_lib.Evaluator(config)
  config.eval.metrics = ("fid_inception",)
  ctx = evaluator_lib.Evaluator(config).context
  assert ctx.prompts(7) == [f"picture {i % 5}" for i in range(7)]
  images = ctx.real_images(3, 16)
  assert images.shape == (3, 16, 16, 3)
  np.testing.assert_allclose(images[1], 40 / 127.5 - 1, atol=1e-6)
  assert ctx.reference_name() == "imagefolder-images-test"
  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_text("a cat\n\na dog\n")
  config.eval.prompts_file = str(prompts_file)
  assert evaluator_lib.Evaluator(config).context.prompts(3) == [
      "a cat", "a dog", "a cat"]
