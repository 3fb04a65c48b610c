"""jaxsd.tracking.sync: a workdir's local MLflow run copied to a tracking
server (here another SQLite store: the sync works for any tracking URI)."""
import numpy as np
import pytest

from jaxsd import errors
from jaxsd.tracking import mlflow_store
from jaxsd.tracking import sync as sync_mlflow


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch):
  """No MLflow variable leaks in or out: the writer sets HTTP defaults."""
  for name in ("MLFLOW_TRACKING_URI", *mlflow_store.MLFLOW_HTTP_DEFAULTS):
    monkeypatch.setenv(name, "")
    monkeypatch.delenv(name)


def _client(uri):
  from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
  return MlflowClient(tracking_uri=uri)


def _histories(client, run_id):
  run = client.get_run(run_id)
  return {key: sorted((m.step, m.value, m.timestamp)
                      for m in client.get_metric_history(run_id, key))
          for key in run.data.metrics}


def _artifacts(client, run_id):
  sizes = sync_mlflow._artifact_sizes(client, run_id)  # pylint: disable=protected-access
  return sorted(sizes.items())


def test_sync_copies_the_local_run_once(tmp_path):
  workdir = str(tmp_path / "run")
  server = "sqlite:///" + str(tmp_path / "server" / "mlflow.db")
  (tmp_path / "server").mkdir()
  writer = mlflow_store.MlflowWriter(workdir, "jaxsd")
  writer.write_hparams({"training": {"batch_size": 8}, "seed": 0})
  for step in range(1, 6):
    writer.write_scalars(step, {"train/loss": 1.0 / step, "system/x": step})
  writer.write_images(2, {"samples": np.zeros((1, 4, 4, 3))})
  writer.close("KILLED")
  local = _client(mlflow_store.local_tracking_uri(workdir))
  src = local.get_run(writer.run_id)

  counts = sync_mlflow.sync(workdir, server)
  dst_client = _client(server)
  dst = dst_client.get_run(counts["run_id"])
  assert dst_client.get_experiment(dst.info.experiment_id).name == "jaxsd"
  assert dst.data.params == src.data.params
  assert dst.data.tags[sync_mlflow.SOURCE_RUN_TAG] == writer.run_id
  assert dst.info.run_name == src.info.run_name
  assert dst.info.status == "KILLED"
  assert _histories(dst_client, dst.info.run_id) == _histories(
      local, writer.run_id)
  assert _artifacts(dst_client, dst.info.run_id) == _artifacts(
      local, writer.run_id) != []
  record = mlflow_store.read_run_record(workdir)
  assert (record.run_id, record.tracking_uri, record.local_run_id) == (
      dst.info.run_id, server, writer.run_id)

  again = sync_mlflow.sync(workdir, server)
  assert again == {"run_id": dst.info.run_id, "metrics": 0, "params": 0,
                   "tags": 0, "artifacts": 0}
  assert _histories(dst_client, dst.info.run_id) == _histories(
      local, writer.run_id)
  # A resume logs at the server from now on.
  resumed = mlflow_store.MlflowWriter(workdir, "jaxsd")
  assert (resumed.run_id, resumed.tracking_uri) == (dst.info.run_id, server)
  resumed.write_scalars(5, {"train/loss": 0.2})  # a replay: dropped
  resumed.write_scalars(6, {"train/loss": 1 / 6})
  resumed.close()
  assert [s for s, _, _ in _histories(dst_client, dst.info.run_id)[
      "train/loss"]] == [1, 2, 3, 4, 5, 6]


def test_a_run_that_fell_back_on_resume_syncs_into_its_server_run(
    tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  server = "sqlite:///" + str(tmp_path / "server.db")
  monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
  first = mlflow_store.MlflowWriter(workdir, "jaxsd")
  for step in range(1, 6):
    first.write_scalars(step, {"train/loss": float(step)})
  # Killed; the resume (from the checkpoint at step 2) finds no server.
  connect = mlflow_store.MlflowWriter._connect  # pylint: disable=protected-access

  def no_server(self, uri, run_id):
    if uri == server:
      raise ConnectionError("server gone")
    connect(self, uri, run_id)
  monkeypatch.setattr(mlflow_store.MlflowWriter, "_connect", no_server)
  resumed = mlflow_store.MlflowWriter(workdir, "jaxsd")
  assert resumed.tracking_uri == mlflow_store.local_tracking_uri(workdir)
  for step in range(3, 9):
    resumed.write_scalars(step, {"train/loss": float(step)})
  resumed.close()
  record = mlflow_store.read_run_record(workdir)
  assert (record.server_uri, record.server_run_id) == (server, first.run_id)
  monkeypatch.undo()

  counts = sync_mlflow.sync(workdir, server)
  assert counts["run_id"] == first.run_id and counts["metrics"] == 3
  dst = _client(server)
  assert [s for s, _, _ in _histories(dst, first.run_id)["train/loss"]] == (
      list(range(1, 9)))
  assert dst.get_run(first.run_id).info.status == "FINISHED"


def test_sync_refuses_what_it_cannot_do(tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(errors.JaxsdError, match="does not exist"):
    sync_mlflow.sync(str(workdir), "sqlite:///" + str(tmp_path / "s.db"))
  assert not workdir.exists()
  workdir.mkdir()
  with pytest.raises(errors.JaxsdError, match="not a workdir"):
    sync_mlflow.sync(str(workdir), "sqlite:///" + str(tmp_path / "s.db"))
  mlflow_store.write_run_record(workdir, mlflow_store.RunRecord(
      "abc", tracking_uri="http://elsewhere:5000"))
  with pytest.raises(errors.JaxsdError, match="lives in http://elsewhere"):
    sync_mlflow.sync(str(workdir), "sqlite:///" + str(tmp_path / "s.db"))
  with pytest.raises(errors.JaxsdError, match="own store"):
    sync_mlflow.sync(str(workdir), mlflow_store.local_tracking_uri(workdir))
