"""Copies a workdir's local MLflow run to a tracking server: what is copied,
and when again, is in jaxsd/tracking/sync.py.

jaxsd-sync-mlflow --workdir=runs/mnist --to=http://mlflow:5000
"""
import os

from absl import app
from absl import flags

from jaxsd.commands import cli

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string("workdir", None, "Training workdir whose local MLflow "
                      "run (WORKDIR/mlflow.db) to copy.")
  flags.DEFINE_string("to", "", "Tracking URI to copy it to (default: "
                      "MLFLOW_TRACKING_URI).")


def main(argv):
  del argv
  if not FLAGS.workdir:
    raise app.UsageError("Give --workdir.")
  to = FLAGS.to or os.environ.get("MLFLOW_TRACKING_URI", "")
  if not to:
    raise app.UsageError("Give --to (or set MLFLOW_TRACKING_URI).")
  from jaxsd.tracking import mlflow_store  # pylint: disable=g-import-not-at-top
  from jaxsd.tracking import sync  # pylint: disable=g-import-not-at-top
  counts = sync.sync(FLAGS.workdir, to)
  print(f"Synced {FLAGS.workdir} to MLflow run {counts['run_id']} at {to}: "
        f"{counts['metrics']} metric values, {counts['params']} params, "
        f"{counts['tags']} tags, {counts['artifacts']} artifacts copied. "
        f"{mlflow_store.MLFLOW_RUN_FILE} points there now.")


def run():
  """The `jaxsd-sync-mlflow` command."""
  cli.run(main, _define_flags)


if __name__ == "__main__":
  run()
