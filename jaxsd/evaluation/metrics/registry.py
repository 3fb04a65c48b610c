"""The metric interface and the name -> class registry behind `eval.metrics`.

As `diffusion/samplers.py` registers samplers: a metric is a class with a
name, not a branch in the evaluator, so adding one touches no other metric.
"""
from typing import Dict, Sequence

import numpy as np

_METRICS: Dict[str, type] = {}


def register_metric(name: str):
  """Class decorator adding a `Metric` subclass to the registry as `name`."""
  def wrap(cls):
    if name in _METRICS:
      raise ValueError(f"Metric {name!r} is already registered.")
    cls.name = name
    _METRICS[name] = cls
    return cls
  return wrap


def metric_names():
  return sorted(_METRICS)


def get_metric(name: str) -> "Metric":
  """A new instance of the metric registered as `name`."""
  if name not in _METRICS:
    raise ValueError(f"Unknown metric {name!r}; choose from {metric_names()} "
                     "(config eval.metrics).")
  return _METRICS[name]()


class Metric:
  """One entry of `eval.metrics`. An instance lives as long as its evaluator,
  so what `prepare` loads is loaded once.

  Networks and data that several metrics use belong in the `EvalContext`
  (jaxsd/evaluation/context.py) every method receives, not here.
  """
  name: str = ""  # set by register_metric
  # The data sources (data.source) the metric can judge; () = any.
  data_sources: Sequence[str] = ()

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
