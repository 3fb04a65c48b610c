"""Plots evaluation metrics of training runs against training minutes.

jaxsd-plot-runs --workdir=runs/a --workdir=runs/b \
    --out=docs/mnist_progress.png \
    [--metrics=eval/prompt_accuracy,eval/fid_mnist]

Reads each run's MLflow run (the store and run id its training wrote in the
workdir, or MLFLOW_TRACKING_URI). The x axis is training wall time
(`system/train_seconds`: evaluation excluded, resumed runs summed), taken at
each evaluated step by interpolating between logged steps.
"""
import os
from typing import Dict, List, Sequence, Tuple

from absl import app
from absl import flags
import numpy as np

from jaxsd.commands import cli
from jaxsd.tracking import mlflow_store

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_multi_string("workdir", [], "Training workdir; repeat to "
                            "compare.")
  flags.DEFINE_multi_string("label", [], "Legend label per workdir "
                            "(default: the workdir's name).")
  flags.DEFINE_list("metrics", ["eval/prompt_accuracy", "eval/fid_mnist"],
                    "Metrics, one panel each.")
  flags.DEFINE_string("out", "progress.png", "PNG to write.")

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


def main(argv):
  del argv
  if not FLAGS.workdir:
    raise app.UsageError("Give at least one --workdir.")
  labels = FLAGS.label or [os.path.basename(os.path.normpath(w))
                           for w in FLAGS.workdir]
  if len(labels) != len(FLAGS.workdir):
    raise app.UsageError("Give one --label per --workdir, or none.")
  plot(FLAGS.workdir, labels, FLAGS.metrics, FLAGS.out)
  print(FLAGS.out)


def run():
  """The `jaxsd-plot-runs` command (`jaxsd-plot-runs`)."""
  cli.run(main, _define_flags)


if __name__ == "__main__":
  run()
