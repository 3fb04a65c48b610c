"""The metric interface and the name -> class registry behind `eval.metrics`.

As `diffusion/samplers.py` registers samplers: a metric is a class with a
name, not a branch in the evaluator, so adding one touches no other metric.
"""
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from jaxsd import registry as jaxsd_registry

_METRICS = jaxsd_registry.Registry("metric", "eval.metrics")
register_metric = _METRICS.register  # class decorator; sets cls.name
metric_names = _METRICS.names


def get_metric(name: str) -> "Metric":
  """A new instance of the metric registered as `name`."""
  return _METRICS.get(name)()


class Metric:
  """One entry of `eval.metrics`. An instance lives as long as its evaluator,
  so what `prepare` loads is loaded once.

  Networks and data that several metrics use belong in the `EvalContext`
  (jaxsd/evaluation/context.py) every method receives, not here.
  """
  name: str = ""  # set by register_metric
  # The data sources (data.source) the metric can judge; () = any.
  data_sources: Sequence[str] = ()
  # True: scores generated samples (`__call__`). False: scores the model
  # itself (`score_model`, e.g. val_loss), and evaluation draws no samples
  # for it.
  needs_samples: bool = True

  def min_samples(self, config, num_prompts: Optional[int]
                  ) -> Tuple[int, str]:
    """The fewest samples (eval.num_samples) the metric gives a meaningful
    number from under `config`, and why: (count, reason). The evaluator
    refuses a config below it before anything runs.

    Args:
      config: the run's config.
      num_prompts: how many evaluation prompts the samples cycle over
        (sample i is drawn for prompt i % num_prompts); None when unknown
        before the data is read (then count as if one).
    """
    del config, num_prompts
    return 1, "one image"

  def prepare(self, ctx) -> None:
    """Loads what the metric needs (networks, reference statistics) ahead of
    the first evaluation, so its time is the evaluation's own.

    Raises:
      jaxsd.hub.WeightsUnavailableError: the metric cannot run on this
        machine (weights missing offline); the evaluator skips it with one
        warning naming the error, so say what to set.
    """
    del ctx

  def __call__(self, images: np.ndarray, prompts: Sequence[str], ctx
               ) -> Dict[str, float]:
    """Scores samples float32 [N, H, W, C] in [-1, 1] drawn for `prompts`.

    Returns flat names: the metric's own name and any `<name>/<part>` or
    derived entries (e.g. `prompt_accuracy/3`, `prompt_accuracy_min`); the
    evaluator adds `seconds/<name>`.
    """
    raise NotImplementedError

  def score_model(self, model, ctx) -> Dict[str, float]:
    """Scores the model itself (metrics with needs_samples=False).

    Called on every process, as sampling is: it may run jitted over
    model.mesh. Loads what it still lacks on first use (`prepare` runs on
    the scoring process only).

    Args:
      model: the `EvalModel` (jaxsd/evaluation/context.py): components,
        params (replicated over the mesh) and mesh.
      ctx: the `EvalContext`.

    Returns flat names, as `__call__`.
    """
    raise NotImplementedError
