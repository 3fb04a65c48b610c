"""SIGTERM (SLURM preemption, `scancel`) and Ctrl-C stop a run cleanly within
seconds, whenever they come: `Preemption` hears them, `Preempted` ends
start-up."""
import contextlib
import os
import select
import signal
import threading
import time
from typing import Callable, List

from absl import logging
import jax

from jaxsd import parallel


class Preempted(BaseException):
  """Raised at the run's own check points when a SIGTERM or Ctrl-C came
  during start-up (a BaseException, so no `except Exception` swallows it)."""


# The signals that stop a run cleanly, and how the logs name them.
STOP_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}
INTERRUPTED_EXIT_CODE = 130  # a second Ctrl-C: the shell's code for SIGINT


class Preemption:
  """SIGTERM (SLURM preemption, `scancel`) and Ctrl-C stop the run cleanly
  within seconds, whenever they come.

  The handler only sets a flag; the main thread acts on it at its own safe
  points: start-up's check points raise `Preempted` (nothing new to save),
  the loop checkpoints after the current step and stops, and skips the
  sample grid and evaluation. Python runs the handler only between
  bytecodes, and a signal can land in a long native call (compiling a
  step) or a long evaluation, so a watchdog thread hears the signals too
  (signal.set_wakeup_fd). If the main thread has not begun stopping
  within `grace_s`, the watchdog ends the run itself: when no state is
  newer than the last checkpoint, at once; during a sample grid or an
  evaluation, after saving the newer state (`save_while`). It then calls
  `on_abort` (MLflow KILLED, metric files flushed, partial checkpoint
  folders removed, lock released), ends the loader's worker processes and
  exits 0, without interpreter shutdown (where a compile left running would
  crash it). A second Ctrl-C ends the run that way at once, without a
  checkpoint (exit code 130).

  With several processes the flag is shared every `sync_every` steps (an
  all-gather at steps that wait for the device anyway), so all processes stop
  at the same step even if only some received the signal; the watchdog does
  not act there (a checkpoint is a collective of all processes).
  """
  grace_s = 3.0

  def __init__(self, sync_every: int = 1):
    self._flag = False
    self.signal_name = ""  # the first stop signal's name, once one came
    self.sync_every = sync_every
    self.unsaved = False  # a state newer than the last checkpoint exists
    self.stopping = False  # the main thread is ending the run itself
    self.on_abort: List[Callable[[], None]] = []
    self._save = None  # saves the newer state during an interruptible chore
    self._interrupts = 0  # Ctrl-Cs the watchdog heard
    self._lock = threading.Lock()
    self._previous = {s: signal.signal(s, self._handler)
                      for s in STOP_SIGNALS}
    self._wakeup_r, self._wakeup_w = os.pipe()
    os.set_blocking(self._wakeup_w, False)
    self._previous_wakeup = signal.set_wakeup_fd(self._wakeup_w)
    self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                      name="jaxsd-signal-watchdog")
    self._watchdog.start()

  def _handler(self, signum, frame):
    del frame
    if not self._flag:
      self.signal_name = STOP_SIGNALS.get(signum, str(signum))
      again = (" Press Ctrl-C again to stop at once, without one."
               if signum == signal.SIGINT else "")
      logging.warning("%s received: stopping (with a checkpoint if the "
                      "state is newer than the last one).%s",
                      self.signal_name, again)
    self._flag = True

  @property
  def requested(self) -> bool:
    """A SIGTERM or Ctrl-C came to this process."""
    return self._flag

  def check(self):
    """A start-up check point: raises Preempted after a stop signal."""
    if self._flag:
      self.stopping = True
      raise Preempted()

  def _watch(self):
    deadline = None
    while True:
      try:
        ready, _, _ = select.select([self._wakeup_r], [], [], 0.05)
        data = os.read(self._wakeup_r, 64) if ready else None
      except (OSError, ValueError):
        return  # restore() closed the pipe
      if data is not None:
        if not data:
          return  # restore() closed the pipe
        self._interrupts += data.count(signal.SIGINT)
        if self._interrupts >= 2:
          self._abort("Ctrl-C twice: no checkpoint of the newest state",
                      INTERRUPTED_EXIT_CODE)
        heard = any(s in data for s in STOP_SIGNALS)
        if deadline is None and heard and jax.process_count() == 1:
          deadline = time.monotonic() + self.grace_s
      if (deadline is not None and not self.stopping
          and time.monotonic() >= deadline):
        with self._lock:
          if self.stopping:
            continue
          if not self.unsaved:
            self._abort("nothing newer than the last checkpoint to save")
          if self._save is not None:
            logging.warning("Stop signal during a sample grid or evaluation: "
                            "checkpointing the newest state.")
            self._save()
            self._abort("the newest state is checkpointed")

  def _abort(self, why: str, exit_code: int = 0):
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
    os._exit(exit_code)  # pylint: disable=protected-access

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
    for s, previous in self._previous.items():
      # None: the previous handler was not set from Python; default it.
      signal.signal(s, signal.SIG_DFL if previous is None else previous)
    signal.set_wakeup_fd(self._previous_wakeup)
    os.close(self._wakeup_w)  # the watchdog reads the end of the pipe and ends
    if self._watchdog is not threading.current_thread():
      self._watchdog.join(timeout=1.0)
    os.close(self._wakeup_r)
