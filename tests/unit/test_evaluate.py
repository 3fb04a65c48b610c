"""The evaluator and the metric registry, with a stand-in classifier:
unknown and unavailable metrics, registering a metric, evaluation beyond
MNIST. With the trained classifier and real runs:
tests/e2e/test_evaluate_runs.py.
"""
import numpy as np
import pytest

from jaxsd import environment
from jaxsd.evaluation import evaluator as evaluator_lib
from jaxsd.evaluation import fid
from jaxsd.evaluation import prompt_metrics
from jaxsd.evaluation.metrics import registry

import helpers


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
  """Flat grey pictures of value 40 i, captioned "picture i"."""
  return helpers.write_imagefolder(
      path, count, image=lambda i: np.full((20, 30, 3), 40 * i, np.uint8),
      text=lambda i: f"picture {i}")


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
