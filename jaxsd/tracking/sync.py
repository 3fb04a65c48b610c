"""Copying a workdir's local MLflow run to a tracking server.

A run whose tracking server did not answer logs to the workdir's own store,
WORKDIR/mlflow.db, instead (see jaxsd.tracking.mlflow_store.MlflowWriter).
`sync(workdir, to)` copies that run into the experiment of the same name at
`to` (created if needed): params, tags, every metric value with its step and
timestamp, the status and the artifacts. Then WORKDIR/mlflow_run.txt points
at the copy, so a later resume of the run logs there. What
`jaxsd-sync-mlflow` runs.

Syncing again copies only what is new. The destination is the run this
workdir synced to before, or the run it started in on that server when it
fell back later (mlflow_run.txt names both), or a run there tagged
jaxsd.source_run_id with the local run's id. A metric value is copied only
at a step its key does not have there yet, params already there are kept,
and an artifact already there with the same size is not sent again. The
workdir's training lock is held meanwhile: a live run is not synced.
"""
import os
import tempfile
from typing import Any, Dict, List, Optional

from absl import logging

from jaxsd import errors
from jaxsd import workdir_lock
from jaxsd.tracking import mlflow_store

SOURCE_RUN_TAG = "jaxsd.source_run_id"
SOURCE_STORE_TAG = "jaxsd.source_tracking_uri"
# MLflow's log_batch limits per request.
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100
_TERMINAL = ("FINISHED", "FAILED", "KILLED")


def sync(workdir: str, to: str) -> Dict[str, Any]:
  """Copies the workdir's local run to `to` and records it there.

  Returns the destination run_id and counts of what was copied: metrics,
  params, tags, artifacts.
  Raises JaxsdError when there is nothing to copy or `to` does not answer.
  """
  mlflow_store.bound_mlflow_http()
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):  # (the lock would create it)
    raise errors.JaxsdError(f"--workdir={workdir} does not exist.")
  with workdir_lock.Lock(workdir):  # no training run writes meanwhile
    record = _local_record(workdir, to)
    local_uri = mlflow_store.local_tracking_uri(workdir)
    _check_answers(to)
    from mlflow.exceptions import MlflowException  # pylint: disable=g-import-not-at-top
    from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
    src = MlflowClient(tracking_uri=local_uri)
    dst = MlflowClient(tracking_uri=to)
    # A run already logging at `to` (synced before) keeps its own status.
    live_here = record.uri(workdir) == local_uri
    try:
      src_run = src.get_run(record.local_run_id)
      dst_id = _destination(dst, to, src, src_run, record)
      counts = _copy(src, src_run, dst, dst_id, local_uri)
      if live_here:
        _copy_status(src_run, dst, dst_id)
    except MlflowException as e:
      # Nothing recorded yet: a second try copies only what is missing.
      raise errors.JaxsdError(
          f"MLflow sync of {workdir} to {to} failed: {e.message}. Values "
          "already copied are not copied twice when this runs again.") from e
    mlflow_store.write_run_record(workdir, mlflow_store.RunRecord(
        dst_id, tracking_uri=to, local_run_id=src_run.info.run_id,
        server_uri=to, server_run_id=dst_id))
  counts["run_id"] = dst_id
  return counts


def _check_answers(to: str):
  """A clear error for a server that is not there, rather than MLflow's
  retries."""
  error = mlflow_store.probe(to) if mlflow_store.is_remote(to) else ""
  if error:
    raise errors.JaxsdError(
        f"MLflow tracking server {to} does not answer ({error}); nothing was "
        "synced. Run this again once it is up.")


def _local_record(workdir: str, to: str) -> mlflow_store.RunRecord:
  """The workdir's record, with local_run_id set; or why there is nothing
  to sync."""
  record = mlflow_store.read_run_record(workdir)
  if record is None:
    raise errors.JaxsdError(
        f"{os.path.join(workdir, mlflow_store.MLFLOW_RUN_FILE)} not found: "
        f"{workdir} is not a workdir with MLflow logging.")
  local = mlflow_store.local_tracking_uri(workdir)
  if to == local:
    raise errors.JaxsdError(f"--to={to} is the workdir's own store; give the "
                            "tracking server to copy the run to.")
  uri = record.uri(workdir)
  if uri == local and not record.local_run_id:  # an older one-line record
    record.local_run_id = record.run_id
  if uri != local and uri != to:
    # Copying only the local part would leave out what was logged at `uri`.
    raise errors.JaxsdError(
        f"The MLflow run of {workdir} lives in {uri}, not in the workdir's "
        "local store; there is nothing of it to sync to another server.")
  if not record.local_run_id or not os.path.exists(
      os.path.join(workdir, "mlflow.db")):
    raise errors.JaxsdError(f"{workdir} has no local MLflow run to sync; its "
                            f"run lives in {uri}.")
  return record


def _destination(dst, to: str, src, src_run, record) -> str:
  """The run at `to` to copy into: found again, or created."""
  src_id = src_run.info.run_id
  if record.server_uri == to and record.server_run_id:
    run = _get_run(dst, record.server_run_id)
    if run is not None:
      return run.info.run_id
  exp_name = src.get_experiment(src_run.info.experiment_id).name
  exp_id = _experiment_id(dst, to, exp_name)
  found = dst.search_runs(
      [exp_id], filter_string=f"tags.`{SOURCE_RUN_TAG}` = '{src_id}'",
      max_results=1)
  if found:
    return found[0].info.run_id
  run = dst.create_run(exp_id, start_time=src_run.info.start_time,
                       run_name=src_run.info.run_name,
                       tags={SOURCE_RUN_TAG: src_id})
  logging.info("Created MLflow run %s in experiment %r at %s.",
               run.info.run_id, exp_name, to)
  return run.info.run_id


def _get_run(client, run_id: str):
  """The run, or None where the store has it not (or only deleted)."""
  from mlflow.exceptions import MlflowException  # pylint: disable=g-import-not-at-top
  try:
    run = client.get_run(run_id)
  except MlflowException as e:
    if e.error_code != "RESOURCE_DOES_NOT_EXIST":
      raise
    return None
  return None if run.info.lifecycle_stage == "deleted" else run


def _experiment_id(client, uri: str, name: str) -> str:
  exp = client.get_experiment_by_name(name)
  if exp is not None:
    return exp.experiment_id
  artifacts = None
  if uri.startswith("sqlite:///"):
    # An SQLite store keeps its artifacts beside it (MLflow's default would
    # be ./mlruns of wherever this command runs).
    db = uri[len("sqlite:///"):]
    artifacts = "file://" + os.path.join(os.path.dirname(os.path.abspath(db)),
                                         "mlartifacts")
  return client.create_experiment(name, artifact_location=artifacts)


def _copy(src, src_run, dst, dst_id: str, local_uri: str) -> Dict[str, int]:
  dst_run = dst.get_run(dst_id)
  counts = {
      "params": _copy_params(src_run, dst, dst_run),
      "tags": _copy_tags(src_run, dst, dst_run, local_uri),
      "metrics": _copy_metrics(src, src_run, dst, dst_run),
      "artifacts": _copy_artifacts(src, src_run.info.run_id, dst, dst_id),
  }
  return counts


def _copy_params(src_run, dst, dst_run) -> int:
  from mlflow.entities import Param  # pylint: disable=g-import-not-at-top
  have = dst_run.data.params
  params = []
  for key, value in src_run.data.params.items():
    if key not in have:
      params.append(Param(key, value))
    elif have[key] != value:  # MLflow params are immutable
      logging.warning("Param %s is %s at the destination and %s locally; "
                      "the destination's value stays.", key, have[key], value)
  for i in range(0, len(params), _MAX_PARAMS):
    dst.log_batch(dst_run.info.run_id, params=params[i:i + _MAX_PARAMS])
  return len(params)


def _copy_tags(src_run, dst, dst_run, local_uri: str) -> int:
  from mlflow.entities import RunTag  # pylint: disable=g-import-not-at-top
  wanted = dict(src_run.data.tags)
  wanted[SOURCE_RUN_TAG] = src_run.info.run_id
  wanted[SOURCE_STORE_TAG] = local_uri
  have = dst_run.data.tags
  tags = [RunTag(k, v) for k, v in wanted.items() if have.get(k) != v]
  for i in range(0, len(tags), _MAX_TAGS):
    dst.log_batch(dst_run.info.run_id, tags=tags[i:i + _MAX_TAGS])
  return len(tags)


def _copy_metrics(src, src_run, dst, dst_run) -> int:
  """Every value of every key at a step that key lacks at the destination
  (by step, not the highest step: a destination that is the run's first
  server run may miss steps in between)."""
  dst_id = dst_run.info.run_id
  batch, copied = [], 0
  for key in sorted(src_run.data.metrics):
    have = set()
    if key in dst_run.data.metrics:
      have = {m.step for m in dst.get_metric_history(dst_id, key)}
    history = src.get_metric_history(src_run.info.run_id, key)
    new = sorted((m for m in history if m.step not in have),
                 key=lambda m: (m.step, m.timestamp))
    for metric in new:
      batch.append(metric)
      if len(batch) == _MAX_METRICS:
        dst.log_batch(dst_id, metrics=batch)
        copied, batch = copied + len(batch), []
  if batch:
    dst.log_batch(dst_id, metrics=batch)
    copied += len(batch)
  return copied


def _artifact_sizes(client, run_id: str, path: Optional[str] = None
                    ) -> Dict[str, int]:
  """{artifact path: size} of every file under `path`."""
  out = {}
  for info in client.list_artifacts(run_id, path):
    if info.is_dir:
      out.update(_artifact_sizes(client, run_id, info.path))
    else:
      out[info.path] = info.file_size
  return out


def _copy_artifacts(src, src_id: str, dst, dst_id: str) -> int:
  have = _artifact_sizes(dst, dst_id)
  missing: List[str] = [path for path, size in _artifact_sizes(
      src, src_id).items() if have.get(path) != size]
  with tempfile.TemporaryDirectory() as tmp:
    for path in missing:
      local = src.download_artifacts(src_id, path, tmp)
      dst.log_artifact(dst_id, local, os.path.dirname(path) or None)
  return len(missing)


def _copy_status(src_run, dst, dst_id: str):
  status = src_run.info.status
  if status in _TERMINAL:
    dst.set_terminated(dst_id, status=status, end_time=src_run.info.end_time)
  else:
    # RUNNING with the workdir unlocked: its training was killed before it
    # could close (kill -9, a lost node); a resume will close it.
    dst.update_run(dst_id, status=status)
