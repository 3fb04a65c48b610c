"""Plots of training runs' evaluation metrics against training minutes.

`plot(workdirs, labels, metrics, out)` reads each run's MLflow run (the
store and run id its training wrote in the workdir, or MLFLOW_TRACKING_URI)
and draws one panel per metric, a line per run. The x axis is training wall
time (`system/train_seconds`: evaluation excluded, resumed runs summed),
taken at each evaluated step by interpolating between logged steps. What
`jaxsd-plot-runs` runs.
"""
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

from jaxsd.tracking import mlflow_store

# The x axis: training seconds, logged at each step (evaluation excluded).
TIME_KEY = "system/train_seconds"


def run_histories(workdir: str, keys: Sequence[str]
                  ) -> Dict[str, List[Tuple[int, float]]]:
  """{key: [(step, value), ...]} of the MLflow run that trained `workdir`."""
  from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
  record = mlflow_store.read_run_record(workdir)
  if record is None:
    run_file = os.path.join(workdir, mlflow_store.MLFLOW_RUN_FILE)
    raise FileNotFoundError(
        f"{run_file} not found: {workdir!r} is not a training workdir with "
        "MLflow logging (logging.mlflow=True).")
  client = MlflowClient(tracking_uri=record.uri(workdir))
  out = {}
  for key in keys:
    history = client.get_metric_history(record.run_id, key)
    out[key] = sorted((m.step, m.value) for m in history)
  return out


def minutes_at(steps: Sequence[int], time_history) -> np.ndarray:
  """Training minutes at `steps`, interpolated from (step, seconds) pairs."""
  if not time_history:
    raise ValueError(f"the run logged no {TIME_KEY}; it predates training-time "
                     "logging.")
  known_steps, seconds = zip(*([(0, 0.0)] + list(time_history)))
  return np.interp(steps, known_steps, seconds) / 60.0


def plot(workdirs: Sequence[str], labels: Sequence[str],
         metrics: Sequence[str], out: str):
  """Writes `out`, a PNG with one panel per metric (FID on a log scale) and
  in each a line per workdir, named by its label, against training
  minutes."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8),
                           squeeze=False)
  for workdir, label in zip(workdirs, labels):
    hist = run_histories(workdir, [TIME_KEY, *metrics])
    for ax, key in zip(axes[0], metrics):
      if not hist[key]:
        continue
      steps, values = zip(*hist[key])
      ax.plot(minutes_at(steps, hist[TIME_KEY]), values, marker="o",
              label=label)
  for ax, key in zip(axes[0], metrics):
    ax.set_xlabel("training minutes (evaluation excluded)")
    ax.set_title(key)
    ax.grid(alpha=0.3)
    if "fid" in key:
      ax.set_yscale("log")
    ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=120)
