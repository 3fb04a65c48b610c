"""Progress: rate, ETA and training time that leaves evaluation out."""
import os
import platform

import pytest

from jaxsd.tracking import memory
from jaxsd.tracking import mlflow_store
from jaxsd.training import progress as progress_lib
from jaxsd.tracking import writers


class FakeClock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


def test_progress_excludes_evaluation_time(monkeypatch):
  clock = FakeClock()
  monkeypatch.setattr(mlflow_store.time, "time", clock)
  progress = progress_lib.Progress(start_step=10, num_steps=110,
                                     train_seconds=30.0)
  clock.now += 20.0  # 20 steps of training ...
  with progress.excluded():
    clock.now += 100.0  # ... an evaluation ...
  clock.now += 20.0  # ... 20 more steps
  assert progress.train_seconds == pytest.approx(70.0)
  out = progress.update(50)
  assert out["system/steps_per_second"] == pytest.approx(1.0)
  assert out["system/train_seconds"] == pytest.approx(70.0)
  assert out["system/eta_seconds"] == pytest.approx(60.0)
  assert out["system/progress_percent"] == pytest.approx(100 * 50 / 110)
  clock.now += 5.0
  assert progress.train_seconds == pytest.approx(75.0)


# --- Host memory ------------------------------------------------------------


@pytest.mark.skipif(platform.system() != "Linux"
                    or platform.libc_ver()[0] != "glibc", reason="glibc")
def test_release_freed_host_memory_returns_a_heap_hole_to_the_os():
  """Freed malloc blocks below a live one stay in RSS (the heap cannot
  shrink past the live block) until `malloc_trim`, which the trainer calls
  after compiling its step: here 200 MB of 2 KB blocks."""
  def rss():
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  blocks = [bytes(2048) for _ in range(100_000)]  # malloc'd, touched
  keep = bytes(2048)  # above them in the heap
  del blocks
  before = rss()
  assert memory.release_freed_host_memory()
  assert before - rss() > 100e6
  del keep


# --- MLflow: a server that is not there, failures mid-run, resumes ---------

import http.server  # pylint: disable=g-import-not-at-top,g-bad-import-order
import socket  # pylint: disable=g-import-not-at-top,g-bad-import-order
import threading  # pylint: disable=g-import-not-at-top,g-bad-import-order
import time  # pylint: disable=g-import-not-at-top,g-bad-import-order

import ml_collections  # pylint: disable=g-import-not-at-top,g-bad-import-order
import numpy as np  # pylint: disable=g-import-not-at-top,g-bad-import-order


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch):
  """No MLflow variable leaks in or out: the writer sets HTTP defaults."""
  for name in ("MLFLOW_TRACKING_URI", *mlflow_store.MLFLOW_HTTP_DEFAULTS):
    monkeypatch.setenv(name, "")
    monkeypatch.delenv(name)  # undo then removes what the writer set


def _warnings(monkeypatch):
  seen = []
  monkeypatch.setattr(mlflow_store.logging, "warning",
                      lambda msg, *args: seen.append(msg % args))
  return seen


def _closed_port_uri():
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  port = s.getsockname()[1]
  s.close()  # nothing listens there now: connections are refused
  return f"http://127.0.0.1:{port}"


@pytest.fixture
def silent_server():
  """An address that accepts connections (the kernel's backlog) and never
  answers."""
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  s.listen(16)
  yield f"http://127.0.0.1:{s.getsockname()[1]}"
  s.close()


@pytest.fixture
def http_status():
  """An HTTP server answering every GET with the status put in the list."""
  status = [404]

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # pylint: disable=invalid-name
      self.send_response(status[0])
      self.end_headers()

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  yield f"http://127.0.0.1:{server.server_address[1]}", status
  server.shutdown()
  server.server_close()


def _history(workdir, run_id, key, uri=None):
  from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
  client = MlflowClient(
      tracking_uri=uri or mlflow_store.local_tracking_uri(workdir))
  return sorted((m.step, m.value) for m in client.get_metric_history(run_id,
                                                                     key))


def _config():
  config = ml_collections.ConfigDict()
  config.logging = ml_collections.ConfigDict(
      {"mlflow": True, "experiment_name": "jaxsd", "run_name": ""})
  return config


def test_unreachable_server_falls_back_to_the_local_store(tmp_path,
                                                          monkeypatch):
  uri = _closed_port_uri()
  monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
  monkeypatch.setattr(mlflow_store, "PROBE_PAUSE_S", 0.1)  # 3 tries
  warnings = _warnings(monkeypatch)
  start = time.time()
  writer, mlflow_writer = writers.create_writers(_config(),
                                                        str(tmp_path))
  assert time.time() - start < 30
  local = mlflow_store.local_tracking_uri(tmp_path)
  assert mlflow_writer.tracking_uri == local
  (warning,) = warnings
  assert uri in warning and "local store" in warning
  assert "jaxsd-sync-mlflow" in warning  # the command that copies it
  writer.write_scalars(1, {"train/loss": 0.5})
  writer.write_scalars(2, {"train/loss": 0.25})
  writer.flush()
  mlflow_writer.close("FINISHED")
  assert _history(tmp_path, mlflow_writer.run_id, "train/loss") == [
      (1, 0.5), (2, 0.25)]
  assert list(tmp_path.glob("events.out.tfevents.*"))
  record = mlflow_store.read_run_record(tmp_path)
  assert (record.run_id, record.tracking_uri, record.server_uri) == (
      mlflow_writer.run_id, mlflow_store.LOCAL_STORE, uri)
  assert mlflow_store.tracking_uri(tmp_path) == local
  # Its resume stays in the local store, says so, and asks no server.
  monkeypatch.setattr(mlflow_store, "probe", None)
  warnings.clear()
  resumed = mlflow_store.MlflowWriter(str(tmp_path), "jaxsd")
  assert (resumed.run_id, resumed.tracking_uri) == (mlflow_writer.run_id,
                                                    local)
  assert len(warnings) == 1 and "fell back" in warnings[0]


def test_a_server_that_never_answers_is_given_up_on_in_time(
    tmp_path, monkeypatch, silent_server):
  monkeypatch.setenv("MLFLOW_TRACKING_URI", silent_server)
  # A faster test (2 tries of 1 s): the defaults' bound is checked below.
  monkeypatch.setattr(mlflow_store, "PROBE_TRIES", 2)
  monkeypatch.setattr(mlflow_store, "PROBE_TIMEOUT_S", (1.0, 1.0))
  warnings = _warnings(monkeypatch)
  start = time.time()
  writer = mlflow_store.MlflowWriter(str(tmp_path), "jaxsd")
  assert time.time() - start < 30
  assert silent_server in warnings[0]
  writer.write_scalars(3, {"train/loss": 1.0})
  assert _history(tmp_path, writer.run_id, "train/loss") == [(3, 1.0)]
  # Default probe settings stay well under ~30 s, whatever the server does.
  worst = (mlflow_store.PROBE_TRIES * sum(mlflow_store.PROBE_TIMEOUT_S)
           + (mlflow_store.PROBE_TRIES - 1) * mlflow_store.PROBE_PAUSE_S)
  assert min(worst, mlflow_store.PROBE_DEADLINE_S) <= 20


def test_probe(monkeypatch, silent_server, http_status):
  uri, status = http_status
  assert mlflow_store.probe(uri) == ""  # 404: a server is there
  status[0] = 401
  assert mlflow_store.probe(uri) == ""
  status[0] = 503
  monkeypatch.setattr(mlflow_store, "PROBE_PAUSE_S", 0.0)
  assert "503" in mlflow_store.probe(uri)
  monkeypatch.setattr(mlflow_store, "PROBE_DEADLINE_S", 0.5)
  start = time.time()
  assert "no answer" in mlflow_store.probe(silent_server)
  assert time.time() - start < 2


def test_http_defaults_leave_the_users_values(monkeypatch):
  monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "99")
  mlflow_store.bound_mlflow_http()
  import mlflow.environment_variables as env  # pylint: disable=g-import-not-at-top
  assert env.MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 99
  assert env.MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 3
  assert env.MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 2


class _Broken:
  """Stands in for a client method once the server has gone."""

  def __init__(self):
    self.calls = 0

  def __call__(self, *args, **kwargs):
    self.calls += 1
    raise ConnectionError("server gone")


def test_failures_mid_run_warn_once_and_stop_mlflow_calls(tmp_path,
                                                          monkeypatch):
  writer = mlflow_store.MlflowWriter(str(tmp_path), "jaxsd")
  writer.write_scalars(1, {"train/loss": 0.5})
  warnings = _warnings(monkeypatch)
  broken = _Broken()
  with monkeypatch.context() as patch:
    for name in ("log_batch", "log_image", "log_text", "log_artifact",
                 "get_run"):
      patch.setattr(writer.client, name, broken)
    writer.write_scalars(2, {"train/loss": 0.4})
    writer.write_scalars(3, {"train/loss": 0.3})
    writer.write_images(3, {"samples": np.zeros((1, 4, 4, 3))})
    writer.write_texts(3, {"note": "x"})
    writer.write_hparams({"a": 1})
    writer.log_artifact(__file__)
  assert broken.calls == 1 and not writer.active
  (warning,) = warnings
  assert "step 2" in warning and str(tmp_path) in warning
  assert "TensorBoard" in warning
  writer.close("FAILED")  # the store answers again at the end
  run = writer.client.get_run(writer.run_id)
  assert run.info.status == "FAILED"
  assert "step 2" in run.data.tags[mlflow_store.INCOMPLETE_TAG]
  assert _history(tmp_path, writer.run_id, "train/loss") == [(1, 0.5)]


def test_close_never_raises(tmp_path, monkeypatch):
  writer = mlflow_store.MlflowWriter(str(tmp_path), "jaxsd")
  warnings = _warnings(monkeypatch)
  for name in ("set_terminated", "set_tag"):
    monkeypatch.setattr(writer.client, name, _Broken())
  writer.close("KILLED")
  assert len(warnings) == 1 and "KILLED" in warnings[0]
  writer.close("FINISHED")  # the first close wins
  assert len(warnings) == 1


def test_a_failing_local_store_leaves_a_no_op_writer(tmp_path, monkeypatch):
  def fail(self, uri, run_id):
    raise OSError("disk full")
  monkeypatch.setattr(mlflow_store.MlflowWriter, "_connect", fail)
  warnings = _warnings(monkeypatch)
  writer = mlflow_store.MlflowWriter(str(tmp_path), "jaxsd")
  assert not writer.active and "disk full" in warnings[0]
  writer.write_scalars(1, {"train/loss": 0.5})
  writer.write_images(1, {"x": np.zeros((4, 4, 3))})
  writer.write_hparams({"a": 1})
  writer.close("FINISHED")
  assert not (tmp_path / mlflow_store.MLFLOW_RUN_FILE).exists()


def test_resume_drops_replayed_steps(tmp_path):
  first = mlflow_store.MlflowWriter(str(tmp_path), "jaxsd")
  for step in range(1, 11):
    first.write_scalars(step, {"a": step, **({"b": -step} if step % 2 else {})})
  # Killed (no close), written by an older jaxsd (one-line run file).
  (tmp_path / mlflow_store.MLFLOW_RUN_FILE).write_text(first.run_id + "\n")
  resumed = mlflow_store.MlflowWriter(str(tmp_path), "jaxsd")
  assert resumed.run_id == first.run_id
  for step in range(5, 13):
    resumed.write_scalars(step, {"a": step, "b": -step, "c": step})
  resumed.close("FINISHED")
  assert _history(tmp_path, first.run_id, "a") == [(s, s) for s in
                                                   range(1, 13)]
  assert [s for s, _ in _history(tmp_path, first.run_id, "b")] == [
      1, 3, 5, 7, 9, 10, 11, 12]
  assert [s for s, _ in _history(tmp_path, first.run_id, "c")] == list(
      range(5, 13))
  record = mlflow_store.read_run_record(tmp_path)
  assert (record.tracking_uri, record.local_run_id) == (
      mlflow_store.LOCAL_STORE, first.run_id)
  # Evaluation re-evaluating a step logs it again.
  evaluation = mlflow_store.MlflowWriter(str(tmp_path), "jaxsd",
                                           mark_running=False)
  evaluation.write_scalars(3, {"a": 30.0})
  assert (3, 30.0) in _history(tmp_path, first.run_id, "a")


def test_a_new_local_store_is_a_copy_of_mlflows_own(tmp_path, monkeypatch):
  """A new workdir's store is copied from the empty store jaxsd keeps in
  its cache (made once by MLflow), not migrated again: the same schema as
  a store MLflow makes itself; runs log and read back in it; a damaged
  empty store is made again, not copied."""
  import sqlite3  # pylint: disable=g-import-not-at-top
  from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("JAXSD_CACHE", str(tmp_path / "cache"))
  template = mlflow_store.empty_store_path()
  assert template.startswith(str(tmp_path / "cache"))
  # MLflow's own store, made by MLflow in a workdir jaxsd does not seed.
  own = tmp_path / "own"
  MlflowClient(tracking_uri=f"sqlite:///{own}/mlflow.db").search_experiments()
  made = []
  real_make = mlflow_store._make_empty_store  # pylint: disable=protected-access
  monkeypatch.setattr(mlflow_store, "_make_empty_store",
                      lambda path: made.append(path) or real_make(path))
  for name in ("a", "b"):
    writer = mlflow_store.MlflowWriter(str(tmp_path / name), "jaxsd")
    writer.write_scalars(1, {"train/loss": 0.5})
    writer.close("FINISHED")
    assert _history(tmp_path / name, writer.run_id, "train/loss") == [
        (1, 0.5)]
  assert made == [template]  # once, for both workdirs

  def schema(db):
    # MLflow's migrations list a table's constraints in no fixed order (two
    # stores it makes can differ there): each statement's lines as a set.
    revision, statements = mlflow_store._store_schema(db)  # pylint: disable=protected-access
    return revision, sorted(
        sorted(line.strip().rstrip(",").strip() for line in sql.splitlines())
        for sql in statements)
  assert schema(str(tmp_path / "a" / "mlflow.db")) == schema(
      str(own / "mlflow.db"))
  assert not mlflow_store.seed_local_store(tmp_path / "a")  # has a store
  # A damaged empty store is made again, then copied.
  with open(template, "r+b") as f:
    f.write(b"\0" * 4096)
  with pytest.raises(sqlite3.DatabaseError):
    schema(template)
  assert mlflow_store.seed_local_store(tmp_path / "c")
  assert made == [template, template]
  assert schema(str(tmp_path / "c" / "mlflow.db")) == schema(
      str(own / "mlflow.db"))


def test_run_record_round_trip(tmp_path):
  record = mlflow_store.RunRecord("abc", tracking_uri="http://h:5000/?x=1",
                                    local_run_id="def")
  mlflow_store.write_run_record(tmp_path, record)
  assert mlflow_store.read_run_record(tmp_path) == record
  assert (tmp_path / mlflow_store.MLFLOW_RUN_FILE).read_text().split(
      "\n")[0] == "abc"  # line 1 stays the bare run id
  assert mlflow_store.tracking_uri(tmp_path) == "http://h:5000/?x=1"



def test_a_moved_workdir_logs_its_images_where_it_now_is(tmp_path):
  """A workdir copied (or moved) elsewhere and resumed there: its store's
  artifact locations follow it, so the old place gets no new files and
  `mlflow ui` on the copy shows the copy's images."""
  import shutil  # pylint: disable=g-import-not-at-top
  image = np.zeros((1, 4, 4, 3))
  first = mlflow_store.MlflowWriter(str(tmp_path / "a"), "jaxsd")
  first.write_images(1, {"samples": image})
  first.close()
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  # The copy resumes in a new process: MLflow's per-process cache of each
  # run's artifact store (keyed by run id) starts empty there.
  from mlflow.tracking._tracking_service import utils  # pylint: disable=g-import-not-at-top
  utils._artifact_repos_cache.clear()  # pylint: disable=protected-access
  copy = mlflow_store.MlflowWriter(str(tmp_path / "b"), "jaxsd")
  assert copy.run_id == first.run_id
  copy.write_images(2, {"samples": image})
  run = copy.client.get_run(copy.run_id)
  assert run.info.artifact_uri.startswith(
      f"file://{tmp_path / 'b' / 'mlartifacts'}/")
  experiment = copy.client.get_experiment(run.info.experiment_id)
  assert experiment.artifact_location == f"file://{tmp_path / 'b' / 'mlartifacts'}"
  copy.close()
  found = lambda d: sorted(p.name for p in (tmp_path / d).rglob("step_*.png"))
  assert found("a") == ["step_00000001.png"]
  assert found("b") == ["step_00000001.png", "step_00000002.png"]
  # The original keeps its own locations.
  utils._artifact_repos_cache.clear()  # pylint: disable=protected-access
  again = mlflow_store.MlflowWriter(str(tmp_path / "a"), "jaxsd")
  assert again.client.get_run(again.run_id).info.artifact_uri.startswith(
      f"file://{tmp_path / 'a' / 'mlartifacts'}/")
  again.close()

# --- TensorBoard event files -------------------------------------------------


def test_tensorboard_reads_what_the_writers_write(tmp_path):
  """Scalars, images (one, and a batch), texts and hparams, written without
  TensorFlow, read back by TensorBoard's own event reader."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator as ea  # pylint: disable=g-import-not-at-top
  from jaxsd.tracking import metric_writer  # pylint: disable=g-import-not-at-top
  writer = metric_writer.MultiWriter([
      metric_writer.LoggingWriter(),
      metric_writer.TensorBoardWriter(str(tmp_path))])
  writer.write_hparams({"optim": {"learning_rate": 1e-3, "schedule": None},
                        "eval": {"metrics": ["fid", "clip"]}, "seed": 3})
  writer.write_scalars(2, {"train/loss": 0.5})
  writer.write_scalars(4, {"train/loss": 0.25})
  grid = np.linspace(0, 1, 6 * 5 * 3).reshape(1, 6, 5, 3)
  writer.write_images(4, {"samples": grid,
                          "examples": np.zeros((2, 4, 4, 1), np.uint8)})
  writer.write_texts(4, {"prompts": "flag of japan"})
  writer.close()
  (events,) = tmp_path.glob("events.out.tfevents.*.v2")
  acc = ea.EventAccumulator(str(events), size_guidance={
      ea.IMAGES: 0, ea.SCALARS: 0, ea.TENSORS: 0})
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
      (2, 0.5), (4, 0.25)]
  (image,) = acc.Images("samples")
  assert (image.step, image.height, image.width) == (4, 6, 5)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  png = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
  np.testing.assert_array_equal(png, metric_writer.image_uint8(grid))
  assert {"examples/image/0", "examples/image/1"} <= set(acc.Tags()["images"])
  (text,) = acc.Tensors("prompts")
  assert text.tensor_proto.string_val == [b"flag of japan"]
  assert "_hparams_/session_start_info" in acc.Tags()["tensors"]
