"""SIGTERM (SLURM preemption, `scancel`) stops a run cleanly within seconds,
whenever it comes: `Preemption` hears it, `Preempted` ends start-up."""
import contextlib
import os
import signal
import threading
import time
from typing import Callable, List

from absl import logging
import jax

from jaxsd import parallel


class Preempted(BaseException):
  """Raised at the run's own check points when a SIGTERM came during
  start-up (a BaseException, so no `except Exception` swallows it)."""


class Preemption:
  """SIGTERM (SLURM preemption, `scancel`) stops the run cleanly within
  seconds, whenever it comes.

  The handler only sets a flag; the main thread acts on it at its own safe
  points: start-up's check points raise `Preempted` (nothing new to save),
  the loop checkpoints after the current step and stops, and skips the
  sample grid and evaluation. Python runs the handler only between
  bytecodes, and a SIGTERM can land in a long native call (compiling a
  step) or a long evaluation, so a watchdog thread hears the signal too
  (signal.set_wakeup_fd). If the main thread has not begun stopping
  within `grace_s`, the watchdog ends the run itself: when no state is
  newer than the last checkpoint, at once; during a sample grid or an
  evaluation, after saving the newer state (`save_while`). It then calls
  `on_abort` (MLflow KILLED, metric files flushed, lock released), ends the
  loader's worker processes and exits 0, without interpreter shutdown
  (where a compile left running would crash it).

  With several processes the flag is shared every `sync_every` steps (an
  all-gather at steps that wait for the device anyway), so all processes stop
  at the same step even if only some received the signal; the watchdog does
  not act there (a checkpoint is a collective of all processes).
  """
  grace_s = 3.0

  def __init__(self, sync_every: int = 1):
    self._flag = False
    self.sync_every = sync_every
    self.unsaved = False  # a state newer than the last checkpoint exists
    self.stopping = False  # the main thread is ending the run itself
    self.on_abort: List[Callable[[], None]] = []
    self._save = None  # saves the newer state during an interruptible chore
    self._lock = threading.Lock()
    self._previous = signal.signal(signal.SIGTERM, self._handler)
    self._wakeup_r, self._wakeup_w = os.pipe()
    os.set_blocking(self._wakeup_w, False)
    self._previous_wakeup = signal.set_wakeup_fd(self._wakeup_w)
    threading.Thread(target=self._watch, daemon=True,
                     name="jaxsd-sigterm-watchdog").start()

  def _handler(self, signum, frame):
    del signum, frame
    if not self._flag:
      logging.warning("SIGTERM received: stopping (with a checkpoint if the "
                      "state is newer than the last one).")
    self._flag = True

  @property
  def requested(self) -> bool:
    """A SIGTERM came to this process."""
    return self._flag

  def check(self):
    """A start-up check point: raises Preempted after a SIGTERM."""
    if self._flag:
      self.stopping = True
      raise Preempted()

  def _watch(self):
    while True:
      try:
        data = os.read(self._wakeup_r, 64)
      except OSError:
        return
      if not data:
        return  # restore() closed the pipe
      if signal.SIGTERM in data and jax.process_count() == 1:
        break
    deadline = time.monotonic() + self.grace_s
    while not self.stopping:
      if time.monotonic() >= deadline:
        with self._lock:
          if self.stopping:
            return
          if not self.unsaved:
            self._abort("nothing newer than the last checkpoint to save")
          if self._save is not None:
            logging.warning("SIGTERM during a sample grid or evaluation: "
                            "checkpointing the newest state.")
            self._save()
            self._abort("the newest state is checkpointed")
      time.sleep(0.05)

  def _abort(self, why: str):
    logging.warning("Stopping now (%s).", why)
    for fn in self.on_abort:
      try:
        fn()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("While stopping: %s", e)
    import multiprocessing  # pylint: disable=g-import-not-at-top
    for child in multiprocessing.active_children():  # the loader's workers
      child.terminate()
    logging.flush()
    os._exit(0)  # pylint: disable=protected-access

  @contextlib.contextmanager
  def save_while(self, save: Callable[[], None]):
    """A block (a sample grid, an evaluation) during which the watchdog may
    save the newer state with `save` and stop the run."""
    with self._lock:
      self._save = save if self.unsaved else None
    try:
      yield
    finally:
      with self._lock:  # the watchdog may be saving: wait for it
        self._save = None

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._flag
    if step % self.sync_every:
      return False
    return parallel.any_process(self._flag)

  def restore(self):
    self.stopping = True
    # None: the previous handler was not set from Python; default it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None
                  else self._previous)
    signal.set_wakeup_fd(self._previous_wakeup)
    os.close(self._wakeup_w)  # ends the watchdog
    os.close(self._wakeup_r)
