"""Files that several processes of a run may share.

Whatever a run prepares on shared disk (tfds datasets, the evaluation cache:
classifier, reference statistics, downloaded weights) may be reached by every
process of a multi-process run at once, by several jobs started together, or
by tests. Nothing here uses collective operations (a `jax.distributed`
barrier would deadlock where only one process prepares or evaluates):
instead files appear whole through a rename, and work that should happen once
is serialised with an advisory file lock (`prepare_once`): one process
prepares while the others wait, then find it prepared.

flock works across nodes on NFSv4 and Lustre/GPFS mounted with locking; a
file system without locks makes `file_lock` fail loudly, not pass silently.
"""
import contextlib
import fcntl
import os
import tempfile
from typing import Callable, IO, Iterator


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write(path: str, write_fn: Callable[[IO[bytes]], None]) -> None:
  """Calls write_fn(binary file) on a temporary file, then renames it to path.

  Readers see the old file or the whole new one, never a partial one; a
  failure leaves no temporary file behind. The file gets the usual
  permissions (mkstemp's are owner-only), so a shared cache stays readable.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-",
                             suffix="-" + os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      write_fn(f)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def file_lock(path: str, shared: bool = False) -> Iterator[bool]:
  """Holds an flock on `path` (created when missing) for the `with` body.

  Exclusive by default; `shared=True` admits other shared holders and waits
  only for an exclusive one. Blocks until granted. The lock is released when
  the body ends or the process dies, so a crashed trainer does not wedge the
  others. Yields whether a lock is held: a shared lock on a read-only cache
  (the lock file cannot be created) is skipped, since nobody can write there.
  """
  f = None
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    f = open(path, "a+b")  # pylint: disable=consider-using-with
  except OSError:
    if not shared:
      raise
  if f is None:
    yield False
    return
  try:
    fcntl.flock(f.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    yield True
  finally:
    f.close()  # closing the descriptor releases the lock


def prepare_once(lock_path: str, is_prepared: Callable[[], bool],
                 prepare: Callable[[], None]) -> bool:
  """Runs prepare() unless is_prepared(), in one process at a time.

  The first process to find nothing prepared takes an exclusive lock on
  `lock_path` and prepares; the others wait for the lock, ask is_prepared()
  again and find the work done. A process that fails while preparing
  releases the lock (also when it dies), and the next waiter prepares.
  Returns whether this call prepared.
  """
  if is_prepared():
    return False
  with file_lock(lock_path):
    if is_prepared():  # prepared while we waited
      return False
    prepare()
  return True
