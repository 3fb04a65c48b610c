"""What the metrics of one evaluator share, loaded on first use and kept.

Three metrics (prompt_accuracy, fid_mnist, diversity) judge samples with the
same MNIST classifier; the context loads (or trains) it once, reads the MNIST
splits once, and runs the classifier once per sample set, however many of
them ask. Metric-specific networks (Inception, CLIP) stay in their metrics.
"""
import dataclasses
import os
import time
from typing import Any, Dict, List, Sequence, Tuple

from absl import logging
import numpy as np

from jaxsd import environment
from jaxsd.data import mnist as input_pipeline
from jaxsd.data import pipeline as data_pipeline
from jaxsd.evaluation import classifier as classifier_lib
from jaxsd.evaluation import prompt_metrics


def cache_dir(eval_config) -> str:
  """eval.cache_dir, else jaxsd's cache ($JAXSD_CACHE or ~/.cache/jaxsd)."""
  return eval_config.cache_dir or environment.cache_dir()


@dataclasses.dataclass(frozen=True)
class EvalModel:
  """The model under evaluation, for the metrics that score it directly
  (`Metric.needs_samples` False, e.g. val_loss).

  Attributes:
    components: its `jaxsd.diffusion.setup.Components` (UNet, text encoder,
      schedule, tokenizer, a latent run's frozen autoencoder).
    params: {"unet", "text"} as sampling uses them (EMA when
      sampling.use_ema; a LoRA run's adapters merged), replicated over mesh.
    mesh: the device mesh.
  """
  components: Any
  params: Any
  mesh: Any


class EvalContext:
  """Shared, lazily loaded resources of the metrics.

  Attributes:
    config: the run's config (the metrics read `eval` and `data`).
    eval_config: config.eval.
    cache_dir: where networks and reference statistics are cached.
    shared_seconds: time spent in shared work (the classifier's pass over the
      samples) during the current evaluation, by name; the evaluator reports
      it as `seconds/<name>` instead of charging the first metric that asked.
  """

  def __init__(self, config):
    self.config = config
    self.eval_config = config.eval
    self.cache_dir = cache_dir(config.eval)
    self.shared_seconds: Dict[str, float] = {}
    self._classifier = None
    self._real_diversity = None
    self._outputs_of = None  # the images `_outputs` belong to
    self._outputs = None
    self._digits_of = None
    self._digits = None
    self._reference_source = None
    self._prompts = None

  # --- Kept for the evaluator's lifetime -------------------------------------
  def mnist(self, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28, 1], labels int32 [N]) of an MNIST split, via
    the data pipeline (which keeps loaded splits in memory)."""
    return input_pipeline.load_mnist(self.config.data, split)

  def classifier(self) -> classifier_lib.Classifier:
    """The MNIST classifier, trained into the cache on first use."""
    if self._classifier is None:
      def arrays():
        return (*self.mnist("train"), *self.mnist("test"))
      self._classifier = classifier_lib.load_or_train_classifier(
          os.path.join(self.cache_dir, "classifier"), arrays)
      logging.info("MNIST classifier %s: test accuracy %.4f",
                   self._classifier.identity, self._classifier.test_accuracy)
    return self._classifier

  def real_diversity(self) -> np.ndarray:
    """Per-digit diversity float64 [10] of the MNIST test split: the yardstick
    of diversity_ratio."""
    if self._real_diversity is None:
      images, labels = self.mnist("test")
      features = self.classifier().features(images)
      self._real_diversity = np.asarray(
          prompt_metrics.diversity(features, labels)["per_digit"])
    return self._real_diversity

  def reference_source(self):
    """The held-out split (eval.reference_split) of the run's data."""
    if self._reference_source is None:
      self._reference_source = data_pipeline.make_source(
          self.config, self.eval_config.reference_split or None)
    return self._reference_source

  def reference_name(self) -> str:
    """Names the reference data in cached statistics: "mnist-test" for
    MNIST, else source, dataset and split."""
    data = self.config.data
    split = self.eval_config.reference_split or data.split
    if data.source == "mnist":
      return f"mnist-{split}"
    what = data.name or os.path.basename(os.path.normpath(data.path)) or "data"
    return f"{data.source}-{what}-{split}".replace("/", "_")

  def real_images(self, count: int, image_size: int) -> np.ndarray:
    """The reference split's first `count` images, float32 [n, S, S, C] in
    [-1, 1], transformed as training images are (centre crop, no flip)."""
    return data_pipeline.preview(self.config, self.reference_source(), count,
                                 image_size)[0]

  def held_out_examples(self, count: int) -> Tuple[np.ndarray, List[str]]:
    """The reference split's first `count` examples as training sees them
    (centre crop, no flip): images float32 [n, S, S, C] in [-1, 1] at
    data.image_size, and their captions."""
    return data_pipeline.preview(self.config, self.reference_source(), count)

  def prompts(self, count: int) -> List[str]:
    """`count` evaluation prompts: eval.prompts_file's lines, else MNIST's
    ten digit captions, else the reference split's captions, cycled."""
    if self._prompts is None:
      if self.eval_config.prompts_file:
        with open(self.eval_config.prompts_file) as f:
          self._prompts = [line.rstrip("\n") for line in f if line.strip()]
      elif self.config.data.source == "mnist":
        self._prompts = [self.config.data.caption_template.format(label=d)
                         for d in range(prompt_metrics.NUM_DIGITS)]
      else:
        self._prompts = data_pipeline.first_captions(self.reference_source(),
                                                     count)
      if not self._prompts:
        raise ValueError("No evaluation prompts: set eval.prompts_file.")
    return [self._prompts[i % len(self._prompts)] for i in range(count)]

  # --- Kept for one sample set -----------------------------------------------
  def classifier_outputs(self, images: np.ndarray
                         ) -> Tuple[np.ndarray, np.ndarray]:
    """Classifier (logits [N, 10], features [N, 128]) of samples [N, H, W, 1]
    (28x28, or 32x32 padded; see `classifier.as_model_input`), computed once
    per sample set."""
    if self._outputs_of is not images:
      start = time.perf_counter()
      self._outputs = self.classifier().logits_and_features(images)
      self._outputs_of = images
      self.shared_seconds["mnist_classifier"] = (
          self.shared_seconds.get("mnist_classifier", 0.0)
          + time.perf_counter() - start)
    return self._outputs

  def prompt_digits(self, prompts: Sequence[str]) -> np.ndarray:
    """int [N] digits the captions ask for."""
    if self._digits_of is not prompts:
      self._digits = prompt_metrics.prompt_digits_of(prompts)
      self._digits_of = prompts
    return self._digits

  def forget_samples(self) -> None:
    """Drops what was computed for the last sample set (and its timing)."""
    self._outputs_of = self._outputs = None
    self._digits_of = self._digits = None
    self.shared_seconds = {}
