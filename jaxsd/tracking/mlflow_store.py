"""A run's MLflow record: where it lives (mlflow_run.txt), whether the
server answers, and the MLflow metric writer (bounded HTTP, a local
fallback, no replayed steps)."""
import contextlib
import dataclasses
import os
import re
import shutil
import sqlite3
import tempfile
import threading
import time
import urllib.parse
from typing import Any, Dict, Mapping, Optional

from absl import logging

from jaxsd import environment
from jaxsd import shared_files
from jaxsd.tracking import metric_writer

MLFLOW_RUN_FILE = "mlflow_run.txt"
# In the run file: the workdir's own store, WORKDIR/mlflow.db. Kept relative
# so that a workdir moved or copied elsewhere still finds its run.
LOCAL_STORE = "local"
# Set on a run whose logging stopped early, saying where and why.
INCOMPLETE_TAG = "jaxsd.mlflow_incomplete"

# The one place jaxsd bounds MLflow's HTTP client. MLflow's own defaults (120 s
# timeout, 7 retries, backoff factor 2, waits capped at 120 s) let one call
# block for ~20 minutes on a server that never answers and ~4 minutes on a
# refused port. With these a call gives up within about a minute (4 tries of
# at most 10 s, waits of 0, 4 and 8 s), which a ~10 s server restart
# survives; after a failure the writer stops calling MLflow. A value already
# in the environment wins.
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
}

# The reachability probe of an http(s) server at start: PROBE_TRIES tries of
# at most PROBE_TIMEOUT_S (connect, read) seconds, PROBE_PAUSE_S apart, never
# more than PROBE_DEADLINE_S in all (a DNS lookup that hangs included).
PROBE_TRIES = 3
PROBE_TIMEOUT_S = (3.0, 3.0)
PROBE_PAUSE_S = 1.0
PROBE_DEADLINE_S = 20.0


def bound_mlflow_http():
  """Puts MLFLOW_HTTP_DEFAULTS in the environment where it has no value of
  its own (MLflow reads them at every call)."""
  for name, value in MLFLOW_HTTP_DEFAULTS.items():
    os.environ.setdefault(name, value)


def local_tracking_uri(workdir) -> str:
  """The workdir's own store: `mlflow ui --backend-store-uri
  sqlite:///WORKDIR/mlflow.db` opens it."""
  return "sqlite:///" + os.path.join(os.path.abspath(workdir), "mlflow.db")


def empty_store_path() -> str:
  """Where jaxsd keeps the empty store new local stores are copied from:
  one per MLflow version, under jaxsd's cache."""
  import mlflow  # pylint: disable=g-import-not-at-top
  return os.path.join(environment.cache_dir(), "mlflow",
                      f"empty-store-mlflow-{mlflow.__version__}.db")


def _store_schema(db: str):
  """(alembic revision, sorted schema statements) of an MLflow sqlite store;
  raises sqlite3.Error (or ValueError) if it is not a whole one."""
  uri = f"file:{urllib.parse.quote(os.path.abspath(db))}?mode=ro"
  with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as con:
    if con.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
      raise ValueError(f"{db} is damaged")
    (revision,), = con.execute("SELECT version_num FROM alembic_version")
    schema = sorted(sql for (sql,) in con.execute(
        "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL"))
  return revision, schema


def _is_whole_store(db: str) -> bool:
  if not os.path.isfile(db):
    return False
  try:
    _store_schema(db)
    return True
  except (sqlite3.Error, ValueError):
    return False


def _make_empty_store(path: str):
  """MLflow creates a store (its ~40 schema migrations) in a temporary
  folder beside `path`, which then appears whole under `path`."""
  from mlflow.store.tracking import sqlalchemy_store  # pylint: disable=g-import-not-at-top
  folder = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".tmp-")
  try:
    db = os.path.join(folder, "mlflow.db")
    # "./mlruns", as MLflow's own default, for its Default experiment (jaxsd
    # logs to its own experiment, with artifacts in the workdir).
    store = sqlalchemy_store.SqlAlchemyStore("sqlite:///" + db, "./mlruns")
    store.engine.dispose()  # no connection stays open on the file
    _store_schema(db)
    os.replace(db, path)
  finally:
    shutil.rmtree(folder, ignore_errors=True)


def seed_local_store(workdir) -> bool:
  """Gives a workdir without a store an empty MLflow store, copied.

  MLflow builds a new sqlite store by running its schema migrations: 1.7-2.2
  s of every new run here, 3.1-3.4 s as a process's first store (2-core AMD
  EPYC, AVX2, 2026-12-07), longer on a network file system. Each new store
  of one MLflow version starts the same, so the first is made once in
  jaxsd's cache (`empty_store_path`) and copied: 0.1 s. Returns whether it
  copied; on any failure (a read-only cache, an empty store MLflow could
  not make) MLflow makes the store itself, as before. The store's unused
  Default experiment keeps the time the empty store was made.
  """
  db = os.path.join(os.path.abspath(workdir), "mlflow.db")
  if os.path.exists(db):
    return False
  try:
    template = empty_store_path()
    # Checked whole before each copy: a damaged empty store (a disk fault)
    # is made again, not copied. The copy appears whole or not at all.
    shared_files.prepare_once(template + ".lock",
                              lambda: _is_whole_store(template),
                              lambda: _make_empty_store(template))
    with open(template, "rb") as source:
      shared_files.atomic_write(
          db, lambda f: shutil.copyfileobj(source, f))
    return True
  except Exception as e:  # pylint: disable=broad-except
    # Only a shortcut: whatever fails here (a read-only cache, a disk fault,
    # another MLflow's internals), MLflow still makes the store.
    logging.info("MLflow: no copy of an empty store for %s (%s); MLflow "
                 "creates it.", db, e)
    return False


def follow_moved_workdir(workdir) -> None:
  """Points the workdir's own store at the workdir's artifacts.

  MLflow records absolute artifact locations (file://WORKDIR/mlartifacts/
  ...). In a workdir moved or copied elsewhere (rsync'd from a cluster, a
  copy to resume from), `mlflow ui` would show the images at the old place
  and the run would log new ones there; the locations under the old
  workdir's mlartifacts/ are rewritten to this one's (the files came with
  the folder). Other locations (set by the user) are left alone.
  """
  workdir = os.path.abspath(workdir)
  db = os.path.join(workdir, "mlflow.db")
  if not os.path.exists(db):
    return
  here = "file://" + os.path.join(workdir, "mlartifacts")
  try:
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as con:
      moved = {loc for (loc,) in con.execute(
          "SELECT artifact_location FROM experiments")
               if loc and loc.startswith("file://")
               and loc.endswith("/mlartifacts") and loc != here}
      with con:  # one transaction
        for old in moved:
          con.execute("UPDATE experiments SET artifact_location = ? "
                      "WHERE artifact_location = ?", (here, old))
          con.execute("UPDATE runs SET artifact_uri = ? || substr("
                      "artifact_uri, ?) WHERE substr(artifact_uri, 1, ?) = ?",
                      (here, len(old) + 1, len(old) + 1, old + "/"))
  except sqlite3.Error as e:  # not MLflow's schema, locked, read-only
    logging.warning("MLflow: could not check where %s keeps artifacts (%s); "
                    "images may be logged where the workdir was before.",
                    db, e)
    return
  for old in sorted(moved):
    logging.info("MLflow: %s was moved or copied from %s; its store now "
                 "keeps artifacts in %s.", workdir,
                 os.path.dirname(old[len("file://"):]), here)


def default_tracking_uri(workdir) -> str:
  """Where a new run goes: MLFLOW_TRACKING_URI, else the local store."""
  return os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri(workdir)


def tracking_uri(workdir) -> str:
  """The store the workdir's MLflow run lives in: the one its
  mlflow_run.txt records, else `default_tracking_uri`."""
  record = read_run_record(workdir)
  return record.uri(workdir) if record else default_tracking_uri(workdir)


def is_remote(uri: str) -> bool:
  return urllib.parse.urlparse(uri).scheme in ("http", "https")


# --- Where a workdir's run lives (mlflow_run.txt) ---------------------------


@dataclasses.dataclass
class RunRecord:
  """WORKDIR/mlflow_run.txt: the MLflow run a workdir logs to, and where.

  Line 1 is the run id (all that older files hold: their store is then
  `default_tracking_uri`), then `key=value` lines, each only when known:

    tracking_uri=   the store of that run; `local` is WORKDIR/mlflow.db
    local_run_id=   the workdir's run in its local store
    server_uri=     the tracking server the run belongs in (the
                    MLFLOW_TRACKING_URI it started with, or a sync's --to)
    server_run_id=  its run there

  A run that fell back to the local store reads tracking_uri=local with a
  server_uri; `jaxsd-sync-mlflow` copies it there later.
  """
  run_id: str
  tracking_uri: str = ""
  local_run_id: str = ""
  server_uri: str = ""
  server_run_id: str = ""

  def uri(self, workdir) -> str:
    """The run's store, resolved for this workdir."""
    if self.tracking_uri == LOCAL_STORE:
      return local_tracking_uri(workdir)
    return self.tracking_uri or default_tracking_uri(workdir)


_RECORD_FIELDS = ("tracking_uri", "local_run_id", "server_uri",
                  "server_run_id")


def read_run_record(workdir) -> Optional[RunRecord]:
  """The workdir's RunRecord, or None without one."""
  path = os.path.join(os.fspath(workdir), MLFLOW_RUN_FILE)
  try:
    with open(path) as f:
      lines = [line.strip() for line in f if line.strip()]
  except FileNotFoundError:
    return None
  if not lines:
    return None
  fields = {}
  for line in lines[1:]:
    key, sep, value = line.partition("=")
    if sep and key.strip() in _RECORD_FIELDS:  # unknown keys: a newer jaxsd
      fields[key.strip()] = value.strip()
  return RunRecord(lines[0], **fields)


def write_run_record(workdir, record: RunRecord):
  """Writes mlflow_run.txt atomically (a crash leaves the old one)."""
  lines = [record.run_id] + [f"{k}={getattr(record, k)}"
                             for k in _RECORD_FIELDS if getattr(record, k)]
  path = os.path.join(os.fspath(workdir), MLFLOW_RUN_FILE)
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(path + ".tmp", path)


# --- Is the server there? ---------------------------------------------------


def probe(uri: str) -> str:
  """"" when the MLflow server at `uri` answers, else what went wrong;
  within PROBE_DEADLINE_S.

  It asks what MLflow's client asks first (experiments/get-by-name), which
  also works under a static prefix or behind a proxy that routes only /api.
  Any answer below HTTP 500 counts: 401/403 mean a server is there (MLflow's
  client brings the credentials).
  """
  result = []
  thread = threading.Thread(target=lambda: result.append(_probe_tries(uri)),
                            daemon=True, name="jaxsd-mlflow-probe")
  thread.start()
  thread.join(PROBE_DEADLINE_S)
  return result[0] if result else (
      f"no answer within {PROBE_DEADLINE_S:.0f} s")


def _probe_tries(uri: str) -> str:
  import requests  # pylint: disable=g-import-not-at-top
  from mlflow import environment_variables as env  # pylint: disable=g-import-not-at-top
  url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/get-by-name"
  # The TLS settings MLflow's client would use.
  verify = (False if env.MLFLOW_TRACKING_INSECURE_TLS.get()
            else env.MLFLOW_TRACKING_SERVER_CERT_PATH.get() or True)
  cert = env.MLFLOW_TRACKING_CLIENT_CERT_PATH.get()
  error = ""
  for i in range(PROBE_TRIES):
    if i:
      time.sleep(PROBE_PAUSE_S)
    try:
      response = requests.get(url, params={"experiment_name": "Default"},
                              timeout=PROBE_TIMEOUT_S, verify=verify,
                              cert=cert)
    except requests.RequestException as e:
      error = _describe(e)
      continue
    if response.status_code < 500:
      return ""
    error = f"HTTP {response.status_code} {response.reason}"
  return error


# What a network error comes down to, inside the pages of text that requests
# and MLflow wrap around it.
_NETWORK_REASON = re.compile(
    r"\[Errno -?\d+\] [^'\")(]+|Read timed out\. \(read timeout=[\d.]+\)|"
    r"timed out")


def _describe(error: BaseException) -> str:
  """One line, short enough for a warning and a tag."""
  text = " ".join(f"{type(error).__name__}: {error}".split())
  reason = _NETWORK_REASON.search(text)
  if reason:
    return f"{type(error).__name__}: {reason.group(0).strip()}"
  return text if len(text) <= 300 else text[:297] + "..."


def _sync_hint(workdir: str, uri: str) -> str:
  return f"jaxsd-sync-mlflow --workdir={workdir} --to={uri}"


# --- The writer ---------------------------------------------------------------


class MlflowWriter(metric_writer.MetricWriter):
  """A MetricWriter that logs to one MLflow run and never stops training.

  Which run: the one WORKDIR/mlflow_run.txt records (`RunRecord`), in the
  store recorded there, so a resumed run logs where it started; else a new
  run in `default_tracking_uri` (MLFLOW_TRACKING_URI, else
  WORKDIR/mlflow.db). For an existing run a different MLFLOW_TRACKING_URI is
  not followed (a warning says so): `jaxsd-sync-mlflow` moves a run.

  A server that does not answer: an http(s) store is probed first
  (`probe`, at most PROBE_DEADLINE_S). If it does not answer, or opening the
  run there fails, a warning names it and the run logs to the local store
  instead: the workdir's local run if it has one, else a new one. The record
  then reads tracking_uri=local with the server_uri, and later resumes keep
  logging locally, saying so, also once the server is back, until
  `jaxsd-sync-mlflow --workdir=WORKDIR --to=URI` copies the run
  to the server and points the record there. If even the local store fails,
  the writer warns and logs nothing (TensorBoard still has the scalars).

  Failures later: the first error of any MLflow call warns once (naming the
  store; the TensorBoard events in the workdir keep the scalars) and the
  writer calls MLflow no more. `close` then tries once to record the status,
  tagging the run `jaxsd.mlflow_incomplete` with where logging stopped.
  MLflow's HTTP calls are bounded by MLFLOW_HTTP_DEFAULTS.

  Replayed steps: a training run reopening its run (`mark_running`: a
  resume) drops a metric value at a step at or below the highest step that
  key already has there: after a kill the steps since the last checkpoint
  are trained again, with the same values. (MLflow keeps as a key's latest
  value the one at its highest step, so one get_run gives those steps.)
  Evaluation (`mark_running=False`) logs everything it is given.
  """

  def __init__(self, workdir: str, experiment_name: str, run_name: str = "",
               mark_running: bool = True):
    self._workdir = os.path.abspath(workdir)
    self._experiment_name = experiment_name
    self._run_name = run_name or os.path.basename(self._workdir)
    self._mark_running = mark_running
    self.client = None
    self.run_id = None
    self.tracking_uri = ""
    self._failure = ""  # what failed, once an MLflow call has
    self._closed = False
    self._logged_through = {}  # key -> highest step the reopened run has
    self._skipped = 0
    bound_mlflow_http()
    self._open(read_run_record(self._workdir))

  # Opening ---------------------------------------------------------------

  def _open(self, record: Optional[RunRecord]):
    """Opens the run (see the class docstring) and records where it is."""
    local = local_tracking_uri(self._workdir)
    uri, run_id = self._target(record)
    new = dataclasses.replace(record or RunRecord(""))
    if uri != local:
      error = probe(uri) if is_remote(uri) else ""
      error = error or self._try_store(uri, run_id)
      if not error:
        new.server_uri, new.server_run_id = uri, self.run_id
      else:
        logging.warning(
            "MLflow tracking server %s is unreachable (%s). This run logs to "
            "the local store %s instead (TensorBoard events are in %s too); "
            "once the server is back, `%s` copies it there.", uri, error,
            local, self._workdir, _sync_hint(self._workdir, uri))
        new.server_uri, new.server_run_id = uri, run_id or new.server_run_id
        uri, run_id = local, new.local_run_id or None
    if uri == local:
      error = self._try_store(local, run_id)
      if error:
        logging.warning("MLflow: the local store %s failed too (%s); this "
                        "run logs nothing to MLflow. The TensorBoard events "
                        "in %s keep the scalars.", local, error,
                        self._workdir)
        return
      new.local_run_id = self.run_id
    new.run_id = self.run_id
    new.tracking_uri = LOCAL_STORE if uri == local else uri
    os.makedirs(self._workdir, exist_ok=True)
    write_run_record(self._workdir, new)
    logging.info("MLflow run %s at %s", self.run_id, uri)

  def _target(self, record: Optional[RunRecord]):
    """(store, run id or None) to open first."""
    if record is None:
      return default_tracking_uri(self._workdir), None
    uri = record.uri(self._workdir)
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri == local_tracking_uri(self._workdir) and record.server_uri:
      logging.warning(
          "MLflow: this run fell back to the local store %s when %s did not "
          "answer, and keeps logging there. `%s` copies it to the server, "
          "and later resumes log there.", uri, record.server_uri,
          _sync_hint(self._workdir, env or record.server_uri))
    elif record.tracking_uri and env and env != uri:
      logging.warning(
          "MLflow: this run lives in %s (%s); MLFLOW_TRACKING_URI=%s is not "
          "used for it. `%s` moves it there.", uri,
          os.path.join(self._workdir, MLFLOW_RUN_FILE), env,
          _sync_hint(self._workdir, env))
    return uri, record.run_id

  def _try_store(self, uri: str, run_id: Optional[str]) -> str:
    """Opens run `run_id` (or a new run) in `uri`: "" or why not."""
    try:
      self._connect(uri, run_id)
      return ""
    except Exception as e:  # pylint: disable=broad-except
      # Whatever the store raises (connection, auth, schema, disk), the
      # caller falls back rather than stopping the run.
      self.client, self.run_id, self._logged_through = None, None, {}
      return _describe(e)

  def _connect(self, uri: str, run_id: Optional[str]):
    from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
    if uri == local_tracking_uri(self._workdir):
      seed_local_store(self._workdir)
      follow_moved_workdir(self._workdir)
    client = MlflowClient(tracking_uri=uri)
    run = self._existing_run(client, uri, run_id) if run_id else None
    if run is None:
      run = client.create_run(self._experiment_id(client, uri),
                              run_name=self._run_name)
    elif self._mark_running:  # a resumed training run; evaluation leaves it be
      client.update_run(run.info.run_id, status="RUNNING")
      self._logged_through = _highest_steps(run)
      if self._logged_through:
        logging.info(
            "MLflow run %s resumed: its %d metrics are logged up to step %d "
            "at most; steps replayed since the last checkpoint are not "
            "logged again.", run.info.run_id, len(self._logged_through),
            max(self._logged_through.values()))
    self.client, self.run_id, self.tracking_uri = client, run.info.run_id, uri

  def _existing_run(self, client, uri: str, run_id: str):
    """The run, or None (a warning) if the store does not have it."""
    from mlflow.exceptions import MlflowException  # pylint: disable=g-import-not-at-top
    try:
      run = client.get_run(run_id)
    except MlflowException as e:
      # Only "no such run" means start again; any other fault (a server
      # error) must not fork the run: the caller falls back instead.
      if e.error_code != "RESOURCE_DOES_NOT_EXIST":
        raise
      run = None
    if run is None or run.info.lifecycle_stage == "deleted":
      logging.warning("MLflow run %s from %s not found in %s; starting a new "
                      "run.", run_id,
                      os.path.join(self._workdir, MLFLOW_RUN_FILE), uri)
      return None
    return run

  def _experiment_id(self, client, uri: str) -> str:
    exp = client.get_experiment_by_name(self._experiment_name)
    if exp is not None:
      return exp.experiment_id
    artifacts = None
    if uri.startswith("sqlite:"):  # keep artifacts beside the local store
      artifacts = "file://" + os.path.join(self._workdir, "mlartifacts")
    return client.create_experiment(self._experiment_name,
                                    artifact_location=artifacts)

  # Calling MLflow ----------------------------------------------------------

  @property
  def active(self) -> bool:
    """Whether MLflow calls are still made (False after a failure)."""
    return self.client is not None and not self._failure

  def _call(self, what: str, fn, *args, **kwargs):
    """fn(*args, **kwargs), or None after it or an earlier call failed."""
    if not self.active:
      return None
    try:
      return fn(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      # Whatever MLflow raises (the server went away, a full disk), training
      # goes on; one warning, then no more MLflow calls.
      self._failure = f"{what} failed: {_describe(e)}"
      logging.warning(
          "MLflow: %s at %s; this run logs nothing more to MLflow. The "
          "TensorBoard events in %s keep the scalars.", self._failure,
          self.tracking_uri, self._workdir)
      return None

  def _replayed(self, key: str, step: int) -> bool:
    through = self._logged_through.get(key)
    if through is not None and step <= through:
      self._skipped += 1
      return True
    return False

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    if not self.active:
      return
    from mlflow.entities import Metric  # pylint: disable=g-import-not-at-top
    step = int(step)
    ts = int(time.time() * 1000)
    metrics = [Metric(k, float(v), ts, step) for k, v in scalars.items()
               if not self._replayed(k, step)]
    for i in range(0, len(metrics), 1000):
      self._call(f"logging metrics at step {step}", self.client.log_batch,
                 self.run_id, metrics=metrics[i:i + 1000])

  def write_images(self, step: int, images: Mapping[str, Any]):
    for key, image in images.items():
      if not self.active:
        return
      self._call(f"logging image {key} at step {int(step)}",
                 self.client.log_image, self.run_id,
                 metric_writer.image_uint8(image),
                 artifact_file=f"{key}/step_{int(step):08d}.png")

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for key, text in texts.items():
      if not self.active:
        return
      self._call(f"logging text {key} at step {int(step)}",
                 self.client.log_text, self.run_id, text,
                 f"{key}/step_{int(step):08d}.txt")

  def write_hparams(self, hparams: Mapping[str, Any]):
    """Logs params; on resume, values that changed are kept and warned about
    (MLflow params are immutable)."""
    if not self.active:
      return
    from mlflow.entities import Param  # pylint: disable=g-import-not-at-top
    run = self._call("reading the run's params", self.client.get_run,
                     self.run_id)
    if run is None:
      return
    existing = run.data.params
    params = []
    for k, v in metric_writer.flatten_dict(hparams).items():
      v = str(v)[:6000]
      if k in existing:
        if existing[k] != v:
          logging.warning("Config %s changed from %s to %s since this MLflow "
                          "run started; MLflow keeps the first value.", k,
                          existing[k], v)
        continue
      params.append(Param(k, v))
    for i in range(0, len(params), 100):
      self._call("logging params", self.client.log_batch, self.run_id,
                 params=params[i:i + 100])

  def log_artifact(self, path: str, artifact_path: Optional[str] = None):
    if self.active:
      self._call(f"logging artifact {path}", self.client.log_artifact,
                 self.run_id, path, artifact_path)

  def flush(self):
    pass  # MlflowClient calls are synchronous

  def close(self, status: str = "FINISHED"):
    """Records how the run ended (FINISHED, FAILED or KILLED); never raises,
    and takes what MLFLOW_HTTP_DEFAULTS bound at most. The first call wins
    (a later MultiWriter.close() must not turn FAILED into FINISHED).
    After a failed call it tries once more (at a server, only if `probe`
    finds it answering), and tags the run jaxsd.mlflow_incomplete with what
    failed."""
    if self._skipped:
      logging.info("MLflow: %d replayed metric values were already in run %s "
                   "and were not logged again.", self._skipped, self.run_id)
      self._skipped = 0
    if self.client is None or self._closed:
      return
    self._closed = True
    if self._failure and is_remote(self.tracking_uri):
      # A server that failed once is asked again only if it now answers:
      # otherwise the close would wait out MLflow's retries a second time.
      error = probe(self.tracking_uri)
      if error:
        logging.warning("MLflow: %s still does not answer (%s); run %s keeps "
                        "the status RUNNING there instead of %s.",
                        self.tracking_uri, error, self.run_id, status)
        return
    try:
      if self._failure:
        self.client.set_tag(self.run_id, INCOMPLETE_TAG, self._failure)
      self.client.set_terminated(self.run_id, status=status)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("MLflow: could not record status %s of run %s at %s "
                      "(%s); the TensorBoard events in %s keep the scalars.",
                      status, self.run_id, self.tracking_uri, _describe(e),
                      self._workdir)


def _highest_steps(run) -> Dict[str, int]:
  """{key: highest step logged} of a run, from its latest metric values."""
  return {m.key: m.step for m in run.data.to_proto().metrics}
