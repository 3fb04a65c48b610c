"""Runs the metrics a config names (`eval.metrics`) on samples of a model.

Metrics are registered by name in jaxsd/evaluation/metrics/, one module each
(`metric_names()` lists them):
  prompt_accuracy  share of samples the MNIST classifier labels as the
                   prompted digit (mean, per digit, worst digit)
  fid_mnist        Fréchet distance in the classifier's penultimate features
                   to the MNIST test split
  diversity        mean pairwise classifier-feature distance within a prompt,
                   and its ratio to real digits'
  fid_inception    standard FID (pytorch-fid Inception weights) to MNIST test
  clip_score       100 x mean image-prompt cosine under a CLIP model
                   (torchmetrics' CLIPScore; also clip_s, clip_cosine)
  val_loss         the training loss on held-out examples at fixed
                   timesteps and noise (mean, per timestep bin)
The evaluator knows none of them by name: it prepares and calls whatever the
config lists, through the shared `EvalContext`. Most metrics score generated
samples (`evaluate`); those that declare `needs_samples = False` score the
model itself (`evaluate_model`), and a config of only those samples
nothing. A metric whose network is unavailable (weights missing offline) is
skipped with one log line and logs nothing.
"""
import os
import time
from typing import Dict, Optional, Sequence

from absl import logging
import jax
import numpy as np

from jaxsd import parallel
from jaxsd.errors import ConfigError
from jaxsd.evaluation import metrics as metrics_lib
from jaxsd.evaluation import prompt_metrics
from jaxsd.evaluation.context import EvalContext
from jaxsd.evaluation.context import EvalModel
from jaxsd.hub import WeightsUnavailableError

metric_names = metrics_lib.metric_names


def num_eval_prompts(config) -> Optional[int]:
  """How many prompts evaluation samples cycle over (`EvalContext.prompts`):
  eval.prompts_file's lines, else MNIST's ten digit captions; None for other
  data without a prompts file (its captions are known once it is read)."""
  path = config.eval.prompts_file
  if path:
    if not os.path.isfile(path):
      raise ConfigError(
          f"eval.prompts_file={path!r} does not exist; give a file with one "
          "prompt a line, or '' for the data's own captions.")
    with open(path) as f:
      count = sum(1 for line in f if line.strip())
    if not count:
      raise ConfigError(f"eval.prompts_file={path!r} has no prompts; give "
                        "one a line.")
    return count
  if config.data.source == "mnist":
    return prompt_metrics.NUM_DIGITS
  return None


def check_config(config, num_samples_key: str = "eval.num_samples"
                 ) -> Dict[str, metrics_lib.Metric]:
  """Raises ConfigError unless every metric of eval.metrics exists, judges
  data.source, and gets at least its minimum of eval.num_samples
  (`Metric.min_samples`); reads no data (a prompts file's lines at most).
  num_samples_key: what the error calls the sample count (jaxsd-evaluate:
  "--num_samples"). Returns {name: a new instance} of the metrics."""
  ev = config.eval
  unknown = set(ev.metrics) - set(metric_names())
  if unknown:
    raise ConfigError(f"eval.metrics has unknown {sorted(unknown)}; known: "
                      f"{metric_names()}.")
  metrics = {name: metrics_lib.get_metric(name) for name in ev.metrics}
  source = config.data.source
  wrong = [name for name, metric in metrics.items()
           if metric.data_sources and source not in metric.data_sources]
  if wrong:
    raise ConfigError(
        f"eval.metrics {wrong} judge {metrics[wrong[0]].data_sources} "
        f"data only, not data.source={source!r}; remove them from "
        "eval.metrics (fid_inception and clip_score judge any images).")
  n = ev.num_samples
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ConfigError(f"{num_samples_key}={n!r} must be an integer >= 1 "
                      "(generated images).")
  if not metrics:
    return metrics
  num_prompts = num_eval_prompts(config)
  needs = {name: metric.min_samples(config, num_prompts)
           for name, metric in metrics.items()}
  short = {name: need for name, need in needs.items() if n < need[0]}
  if short:
    most = max(count for count, _ in short.values())
    parts = "; ".join(f"{name} needs >= {count} ({why})"
                      for name, (count, why) in short.items())
    raise ConfigError(
        f"{num_samples_key}={n} is too few for eval.metrics: {parts}. Set "
        f"{num_samples_key} >= {most}, or remove "
        f"{'that metric' if len(short) == 1 else 'those metrics'} from "
        "eval.metrics.")
  return metrics


class Evaluator:
  """Loads the judging networks once; evaluates sample sets on demand."""

  def __init__(self, config, num_samples_key: str = "eval.num_samples"):
    """Checks the config (`check_config`: metric names, data source,
    eval.num_samples against each metric's minimum, the error calling the
    count num_samples_key); loads nothing yet."""
    self.config = config
    self.eval_config = config.eval
    self._metrics = check_config(config, num_samples_key)
    self.context = EvalContext(config)
    self.cache_dir = self.context.cache_dir
    self._prepared = set()
    self._skipped: Dict[str, str] = {}

  @property
  def metrics(self) -> Sequence[str]:
    """The configured metrics, less those skipped so far."""
    return tuple(m for m in self.eval_config.metrics if m not in self._skipped)

  @property
  def skipped(self) -> Dict[str, str]:
    """{metric: why} of the metrics skipped so far (networks unavailable)."""
    return dict(self._skipped)

  def classifier(self):
    return self.context.classifier()

  def real_diversity(self) -> np.ndarray:
    """Per-digit diversity [10] of the MNIST test split: the yardstick of
    diversity_ratio."""
    return self.context.real_diversity()

  def _ready(self, name: str) -> bool:
    """Prepares metric `name` once; False when it is skipped."""
    if name in self._skipped:
      return False
    if name not in self._prepared:
      try:
        self._metrics[name].prepare(self.context)
      except WeightsUnavailableError as e:
        logging.warning("Skipping eval/%s: %s", name, e)
        self._skipped[name] = str(e)
        return False
      self._prepared.add(name)
    return True

  @property
  def needs_samples(self) -> bool:
    """Whether any metric (not skipped) scores generated samples."""
    return any(self._metrics[m].needs_samples for m in self.metrics)

  @property
  def scores_model(self) -> bool:
    """Whether any metric (not skipped) scores the model itself."""
    return any(not self._metrics[m].needs_samples for m in self.metrics)

  def prepare(self, sample_metrics: bool = True):
    """Loads every network and reference statistic the metrics need, so the
    first evaluation's time is the evaluation's own. sample_metrics=False:
    only the metrics that score the model (every process runs those; only
    the scoring process needs the others)."""
    for name, metric in self._metrics.items():
      if sample_metrics or not metric.needs_samples:
        self._ready(name)
    return self

  def evaluate_model(self, model: EvalModel) -> Dict[str, float]:
    """The metrics that score the model itself (e.g. val_loss), and
    seconds/<metric>. Every process must call it: they may run jitted over
    model.mesh; each process gets the same numbers."""
    out: Dict[str, float] = {}
    for name, metric in self._metrics.items():
      if metric.needs_samples or not self._ready(name):
        continue
      start = time.perf_counter()
      out.update(metric.score_model(model, self.context))
      out[f"seconds/{name}"] = time.perf_counter() - start
    return out

  def evaluate(self, images: np.ndarray, prompts: Sequence[str]
               ) -> Dict[str, float]:
    """Metrics of samples [N, H, W, C] in [-1, 1] drawn for `prompts`.

    Every metric sees the images as they are: the MNIST-classifier metrics
    accept 28x28 or 32x32 grey digits (`classifier.as_model_input`),
    Inception and CLIP resize for themselves.

    Returns flat names: each metric's entries (prompt_accuracy,
    prompt_accuracy/<d>, prompt_accuracy_min, fid_mnist, diversity,
    diversity/<d>, diversity_ratio(/<d>, _min), fid_inception, clip_score,
    clip_s, clip_cosine), seconds/<metric>, and seconds/mnist_classifier for the
    classifier's pass shared by its metrics.
    """
    images = np.asarray(images, np.float32)
    ctx = self.context
    out: Dict[str, float] = {}
    ctx.forget_samples()
    try:
      for name, metric in self._metrics.items():
        if not metric.needs_samples or not self._ready(name):
          continue
        shared_before = sum(ctx.shared_seconds.values())
        start = time.perf_counter()
        out.update(metric(images, prompts, ctx))
        shared = sum(ctx.shared_seconds.values()) - shared_before
        out[f"seconds/{name}"] = time.perf_counter() - start - shared
      out.update({f"seconds/{k}": v for k, v in ctx.shared_seconds.items()})
    finally:
      ctx.forget_samples()
    return out


def any_metric_runs(evaluator: Evaluator) -> bool:
  """Whether any metric of eval.metrics can run, on every process (a
  collective: all must call it). Process 0, which scores the samples,
  prepares every metric (`Evaluator.prepare`), the others those that score
  the model (which every process runs); process 0's answer is everyone's.
  Evaluation generates images only when it is True."""
  first = jax.process_index() == 0
  prepared = evaluator.prepare(sample_metrics=first)
  return parallel.any_process(first and bool(prepared.metrics))


def nothing_runs_message(evaluator: Evaluator) -> str:
  """Why no metric of eval.metrics can run (process 0 knows the reasons)."""
  reasons = "; ".join(f"{name}: {' '.join(why.split())}"  # one line
                      for name, why in evaluator.skipped.items()
                      ) or "see process 0's log"
  return (f"None of eval.metrics {list(evaluator.eval_config.metrics)} can "
          f"run on this machine ({reasons})")


def evaluate_params(evaluator: Evaluator, generator, params, rng
                    ) -> Optional[Dict[str, float]]:
  """Evaluates params: the metrics that score the model itself
  (`Evaluator.evaluate_model`, with generator.components and .mesh), then,
  if any metric needs samples, eval.num_samples images (prompts cycling
  over the evaluation prompts) drawn with generator(params, prompts, rng)
  and scored; adds seconds (total) and, when it sampled, sampling_seconds.
  The generation's progress (images done, rate, ETA) is logged every ~10 s.

  generator: a `generate.Generator`. Every process must call it: sampling
  and the model's metrics run sharded over all devices (the images
  gathered). Process 0 alone scores the samples, which takes no collective
  step, and the others return None. Callers check `any_metric_runs` first:
  images no metric scores are not worth generating.
  """
  from jaxsd.diffusion import generate  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  model_metrics = {}
  if evaluator.scores_model:
    model_metrics = evaluator.evaluate_model(
        EvalModel(generator.components, params, generator.mesh))
  images = prompts = None
  # Process 0 knows which sample metrics run (the others did not prepare
  # them); every process samples, or none.
  first = jax.process_index() == 0
  if parallel.any_process(first and evaluator.needs_samples):
    sampling_start = time.perf_counter()
    prompts = evaluator.context.prompts(evaluator.eval_config.num_samples)
    if first:
      logging.info("Evaluation: generating %d images for %s.", len(prompts),
                   ", ".join(evaluator.metrics))
    images = generator(params, prompts, rng,
                       progress=generate.ProgressLog("Evaluation"))
    sampling = time.perf_counter() - sampling_start
  if jax.process_index() != 0:
    return None
  metrics = {}
  if images is not None:
    metrics.update(evaluator.evaluate(images, prompts))
    metrics["sampling_seconds"] = sampling
  metrics.update(model_metrics)
  metrics["seconds"] = time.perf_counter() - start
  return metrics
