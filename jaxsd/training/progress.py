"""Training progress: step rate, percentage, ETA, training time, and the
console line; `timed` for a block's duration."""
import contextlib
import datetime
import time
from typing import Dict, Mapping

from absl import logging
import numpy as np


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
