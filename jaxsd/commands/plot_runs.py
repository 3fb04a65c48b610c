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

from absl import app
from absl import flags

from jaxsd.commands import cli

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_multi_string("workdir", [], "Training workdir; repeat to "
                            "compare.")
  flags.DEFINE_multi_string("label", [], "Legend label per workdir "
                            "(default: the workdir's name).")
  flags.DEFINE_list("metrics", ["eval/prompt_accuracy", "eval/fid_mnist"],
                    "Metrics, one panel each.")
  flags.DEFINE_string("out", "progress.png", "PNG to write.")


def main(argv):
  del argv
  if not FLAGS.workdir:
    raise app.UsageError("Give at least one --workdir.")
  labels = FLAGS.label or [os.path.basename(os.path.normpath(w))
                           for w in FLAGS.workdir]
  if len(labels) != len(FLAGS.workdir):
    raise app.UsageError("Give one --label per --workdir, or none.")
  from jaxsd.tracking import plots  # pylint: disable=g-import-not-at-top
  plots.plot(FLAGS.workdir, labels, FLAGS.metrics, FLAGS.out)
  print(FLAGS.out)


def run():
  """The `jaxsd-plot-runs` command."""
  cli.run(main, _define_flags)


if __name__ == "__main__":
  run()
