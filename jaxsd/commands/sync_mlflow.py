"""Copies a workdir's local MLflow run to a tracking server.

jaxsd-sync-mlflow --workdir=runs/mnist --to=http://mlflow:5000

A run whose tracking server did not answer logs to the workdir's own store,
WORKDIR/mlflow.db, instead (see jaxsd.tracking.mlflow_store.MlflowWriter). This
copies that run into the experiment of the same name at --to (created if
needed): params, tags, every metric value with its step and timestamp, the
status and the artifacts. Then WORKDIR/mlflow_run.txt points at the copy, so
a later resume of the run logs there. --to may be any MLflow tracking URI
(default: MLFLOW_TRACKING_URI).

Syncing again copies only what is new. The destination is the run this
workdir synced to before, or the run it started in on that server when it
fell back later (mlflow_run.txt names both), or a run there tagged
jaxsd.source_run_id with the local run's id. A metric value is copied only
at a step its key does not have there yet, params already there are kept,
and an artifact already there with the same size is not sent again. The
workdir's training lock is held meanwhile: a live run is not synced.
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
