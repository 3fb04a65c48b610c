"""Metric writers (clu + MLflow), console progress and memory figures.

Only process 0 writes: other processes get a logging-only writer that drops
everything but the console.
"""
import contextlib
import datetime
import os
import resource
import time
from typing import Any, Dict, Mapping, Optional

from absl import logging
from clu import metric_writers
from clu.metric_writers import interface
import jax
import numpy as np

MLFLOW_RUN_FILE = "mlflow_run.txt"


def tracking_uri(workdir: str) -> str:
  """MLFLOW_TRACKING_URI, else an SQLite store in the workdir (`mlflow ui
  --backend-store-uri sqlite:///WORKDIR/mlflow.db` opens it)."""
  return os.environ.get("MLFLOW_TRACKING_URI") or (
      "sqlite:///" + os.path.join(os.path.abspath(workdir), "mlflow.db"))


def flatten_dict(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten_dict(v, key + "."))
    else:
      out[key] = v
  return out


class MlflowWriter(interface.MetricWriter):
  """A clu MetricWriter that logs to one MLflow run.

  The run id is kept in WORKDIR/mlflow_run.txt so a resumed training run keeps
  logging into the same MLflow run.
  """

  def __init__(self, workdir: str, experiment_name: str, run_name: str = "",
               mark_running: bool = True):
    import mlflow  # pylint: disable=g-import-not-at-top
    from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
    self._workdir = os.path.abspath(workdir)
    uri = tracking_uri(workdir)
    self.client = MlflowClient(tracking_uri=uri)
    exp = self.client.get_experiment_by_name(experiment_name)
    if exp is None:
      artifacts = None
      if uri.startswith("sqlite:"):  # keep artifacts beside the local store
        artifacts = "file://" + os.path.join(self._workdir, "mlartifacts")
      exp_id = self.client.create_experiment(experiment_name,
                                             artifact_location=artifacts)
    else:
      exp_id = exp.experiment_id
    run_file = os.path.join(self._workdir, MLFLOW_RUN_FILE)
    self.run_id = None
    if os.path.exists(run_file):
      with open(run_file) as f:
        run_id = f.read().strip()
      try:
        self.client.get_run(run_id)
        self.run_id = run_id
        if mark_running:  # a resumed training run; evaluation leaves it be
          self.client.update_run(run_id, status="RUNNING")
      except mlflow.exceptions.MlflowException:
        logging.warning("MLflow run %s from %s not found in %s; starting a "
                        "new run.", run_id, run_file, uri)
    if self.run_id is None:
      run = self.client.create_run(
          exp_id, run_name=run_name or os.path.basename(self._workdir))
      self.run_id = run.info.run_id
      with open(run_file + ".tmp", "w") as f:
        f.write(self.run_id)
      os.replace(run_file + ".tmp", run_file)
    logging.info("MLflow run %s at %s", self.run_id, uri)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    from mlflow.entities import Metric  # pylint: disable=g-import-not-at-top
    ts = int(time.time() * 1000)
    metrics = [Metric(k, float(v), ts, int(step)) for k, v in scalars.items()]
    for i in range(0, len(metrics), 1000):
      self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

  def write_summaries(self, step, values, metadata=None):
    self.write_scalars(step, {k: v for k, v in values.items()
                              if np.ndim(v) == 0})

  def write_images(self, step: int, images: Mapping[str, Any]):
    for key, image in images.items():
      image = np.asarray(image)
      if image.ndim == 4:
        image = image[0]
      if image.dtype != np.uint8:
        image = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
      if image.shape[-1] == 1:
        image = image[..., 0]
      self.client.log_image(self.run_id, image,
                            artifact_file=f"{key}/step_{int(step):08d}.png")

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for key, text in texts.items():
      self.client.log_text(self.run_id, text,
                           f"{key}/step_{int(step):08d}.txt")

  def write_hparams(self, hparams: Mapping[str, Any]):
    """Logs params; on resume, values that changed are kept and warned about
    (MLflow params are immutable)."""
    from mlflow.entities import Param  # pylint: disable=g-import-not-at-top
    existing = self.client.get_run(self.run_id).data.params
    params = []
    for k, v in flatten_dict(hparams).items():
      v = str(v)[:6000]
      if k in existing:
        if existing[k] != v:
          logging.warning("Config %s changed from %s to %s since this MLflow "
                          "run started; MLflow keeps the first value.", k,
                          existing[k], v)
        continue
      params.append(Param(k, v))
    for i in range(0, len(params), 100):
      self.client.log_batch(self.run_id, params=params[i:i + 100])

  def log_artifact(self, path: str, artifact_path: Optional[str] = None):
    self.client.log_artifact(self.run_id, path, artifact_path)

  def write_videos(self, step, videos):
    pass  # jaxsd writes no videos

  def write_audios(self, step, audios, *, sample_rate):
    pass  # jaxsd writes no audio

  def write_histograms(self, step, arrays, num_buckets=None):
    pass  # histograms go to TensorBoard only

  def flush(self):
    pass  # MlflowClient calls are synchronous

  def close(self, status: str = "FINISHED"):
    self.client.set_terminated(self.run_id, status=status)


def create_writers(config, workdir: str):
  """(writer, mlflow_writer or None): clu's default writer (TensorBoard +
  console) plus MLflow, on process 0; a console-only writer elsewhere."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(workdir, just_logging=True), None
  default = metric_writers.create_default_writer(workdir, asynchronous=False)
  if not config.logging.mlflow:
    return default, None
  mlflow_writer = MlflowWriter(workdir, config.logging.experiment_name,
                               config.logging.run_name)
  return metric_writers.MultiWriter([default, mlflow_writer]), mlflow_writer


def memory_gb() -> float:
  """Device memory in use (GPU/TPU) where reported, else host RSS, in GiB."""
  stats = jax.local_devices()[0].memory_stats()
  if stats and "bytes_in_use" in stats:
    return stats["bytes_in_use"] / 2**30
  try:
    with open("/proc/self/statm") as f:
      rss_pages = int(f.read().split()[1])
    return rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**30
  except (OSError, ValueError):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_memory_gb() -> float:
  """Peak device memory (GPU/TPU) where reported, else the process's peak
  RSS, in GiB."""
  stats = jax.local_devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**30
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@contextlib.contextmanager
def timed(what: str):
  """Logs how long the block took."""
  start = time.perf_counter()
  try:
    yield
  finally:
    logging.info("%s took %.1f s", what, time.perf_counter() - start)


class Progress:
  """Step rate, percentage, ETA and training time; console line.

  `train_seconds` is the wall time spent training, summed over resumed runs
  (saved in checkpoints) and excluding what runs inside `excluded()`
  (evaluation, sample grids), so runs compare by training time.
  """

  def __init__(self, start_step: int, num_steps: int,
               train_seconds: float = 0.0):
    self.num_steps = num_steps
    self._last_step, self._last_time = start_step, time.time()
    self._train_seconds = train_seconds
    self._excluded = 0.0  # seconds excluded since the last update
    self._data_wait = 0.0  # seconds waiting for batches since the last update

  @contextlib.contextmanager
  def excluded(self):
    start = time.time()
    try:
      yield
    finally:
      self._excluded += time.time() - start

  @property
  def train_seconds(self) -> float:
    """Training seconds up to now."""
    return self._train_seconds + max(
        time.time() - self._last_time - self._excluded, 0.0)

  def add_data_wait(self, seconds: float):
    """Time the loop waited for the loader's next batch."""
    self._data_wait += seconds

  def update(self, step: int) -> Dict[str, float]:
    now = time.time()
    seconds = max(now - self._last_time - self._excluded, 1e-9)
    rate = (step - self._last_step) / seconds
    self._train_seconds += seconds
    self._last_step, self._last_time, self._excluded = step, now, 0.0
    data_wait, self._data_wait = self._data_wait, 0.0
    eta = (self.num_steps - step) / rate if rate > 0 else float("inf")
    return {"system/steps_per_second": rate,
            # Share of training time the loop waited for the next batch.
            "system/data_wait_percent": 100.0 * min(data_wait / seconds, 1.0),
            "system/progress_percent": 100.0 * step / self.num_steps,
            "system/eta_seconds": eta,
            "system/train_seconds": self._train_seconds}

  def line(self, step: int, scalars: Mapping[str, float]) -> str:
    eta = scalars["system/eta_seconds"]
    eta_s = (str(datetime.timedelta(seconds=int(eta)))
             if np.isfinite(eta) else "?")
    return (f"step {step}/{self.num_steps} "
            f"({scalars['system/progress_percent']:.1f}%) "
            f"loss {scalars['train/loss']:.4f} "
            f"lr {scalars['train/learning_rate']:.2e} "
            f"{scalars['system/steps_per_second']:.2f} steps/s "
            f"mem {scalars['system/memory_gb']:.2f} GB ETA {eta_s}")
