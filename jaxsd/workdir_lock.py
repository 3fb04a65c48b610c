"""One training process per workdir: `Lock` (WORKDIR/train.lock, naming the
holder's PID and host); a dead holder never leaves it stuck."""
import errno
import fcntl
import json
import os
import socket
import threading
import time
from typing import Any, Dict, Mapping, Optional

from absl import logging

from jaxsd import errors

LOCK_FILE = "train.lock"
# Where the file system has no flock (some NFS/Lustre mounts), a holder on
# another host is alive while it touches the lock file: every HEARTBEAT_S,
# stale after STALE_S without a touch.
HEARTBEAT_S = 30.0
STALE_S = 120.0


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


class Lock:
  """The workdir's training lock, held from `acquire` to `release`.

  An exclusive flock on WORKDIR/train.lock, which the kernel drops when the
  holder dies (kill -9 included); the file names the holder for the error
  message. Without flock support, a holder counts as alive while its PID
  lives (same host) or it touched the file within STALE_S (another host).
  """

  def __init__(self, workdir: str, use_flock: bool = True):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self._use_flock = use_flock
    self._fd = None
    self._stop = threading.Event()
    self._heartbeat = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()

  def holder(self) -> Dict[str, Any]:
    try:
      with open(self.path) as f:
        return json.loads(f.read() or "{}")
    except (OSError, ValueError):
      return {}

  def _busy(self, holder: Mapping[str, Any]) -> errors.WorkdirBusyError:
    since = holder.get("started", "?")
    return errors.WorkdirBusyError(
        f"{os.path.dirname(self.path)} is in use by another training process "
        f"(PID {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
        f"started {since}; lock file {self.path}). One run per workdir: wait "
        "for it to finish, stop it, or train in another --workdir.")

  def _holder_alive(self, holder: Mapping[str, Any]) -> bool:
    if not holder:
      return False
    if holder.get("host") == socket.gethostname():
      return _pid_alive(int(holder.get("pid", -1)))
    try:
      return time.time() - os.stat(self.path).st_mtime < STALE_S
    except OSError:
      return False

  def _not_writable(self, e: OSError) -> errors.NotWritableError:
    workdir = os.path.dirname(self.path)
    return errors.NotWritableError(
        f"Cannot write the workdir {workdir} ({os.strerror(e.errno)}: "
        f"creating {e.filename or self.path}); a run writes its lock, "
        "checkpoints and logs there: make it writable (or mount it "
        "read-write), or train in another --workdir.")

  def _open(self) -> int:
    """The lock file's descriptor (created, with its folders)."""
    try:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        raise self._not_writable(e) from None
      raise

  def acquire(self):
    while True:
      fd = self._open()
      locked = self._flock(fd)
      if locked is False:
        holder = self.holder()
        os.close(fd)
        raise self._busy(holder)
      if locked is None:  # no flock here: judge the holder by its record
        holder = self.holder()
        if holder.get("pid") != os.getpid() and self._holder_alive(holder):
          os.close(fd)
          raise self._busy(holder)
        if holder:
          logging.warning("Taking over the stale lock %s of PID %s on %s (no "
                          "longer running).", self.path, holder.get("pid"),
                          holder.get("host"))
      # The holder before us may have removed the file between our open and
      # our lock: then we locked a deleted file; start again.
      try:
        if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
          break
      except FileNotFoundError:
        pass
      os.close(fd)
    self._fd = fd
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)
    os.fsync(fd)
    self._heartbeat = threading.Thread(target=self._beat, daemon=True,
                                       name="jaxsd-workdir-lock")
    self._heartbeat.start()

  def _flock(self, fd) -> Optional[bool]:
    """True: locked; False: held by another process; None: no flock."""
    if not self._use_flock:
      return None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return True
    except BlockingIOError:
      return False
    except OSError as e:
      if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        logging.warning("%s: no flock on this file system (%s); the lock "
                        "relies on its holder's PID and heartbeat.",
                        self.path, e)
        return None
      raise

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_S):
      try:
        os.utime(self.path)
      except OSError:
        pass

  def release(self):
    if self._fd is None:
      return
    self._stop.set()
    try:
      if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
        os.unlink(self.path)  # while still locked: nobody else holds it
    except OSError:
      pass
    os.close(self._fd)  # drops the flock
    self._fd = None
