"""A training run's workdir: one process at a time, and what a resume may
change.

`Lock` keeps a second training process out of a workdir while the first
lives (`WORKDIR/train.lock`, naming the holder's PID and host); a dead
holder never leaves it stuck. `check_resume` compares a new config with the
one the run's latest checkpoint was trained with, before anything is
restored or written.
"""
import errno
import fcntl
import json
import os
import socket
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

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

  def acquire(self):
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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


# --- What a resume may change -------------------------------------------------

# Fields that shape the train state or fix what its numbers mean, per kind
# of run. A resume with any of them changed would fail deep inside the
# restore or silently train another model; a "." at the end means every
# field under it.
FIXED = {
    "diffusion": ("model.", "text.", "diffusion.prediction_type",
                  "diffusion.num_timesteps", "diffusion.schedule",
                  "diffusion.beta_start", "diffusion.beta_end",
                  "diffusion.rescale_zero_snr", "optim.grad_accum_steps"),
    "autoencoder": ("autoencoder.block_out_channels",
                    "autoencoder.layers_per_block",
                    "autoencoder.latent_channels",
                    "autoencoder.norm_num_groups",
                    "autoencoder.mid_block_add_attention",
                    "autoencoder.use_quant_conv",
                    "autoencoder.use_post_quant_conv",
                    "autoencoder.disc_channels", "autoencoder.disc_layers",
                    "data.num_channels", "optim.grad_accum_steps"),
}
# ...except these: where weights were first loaded from (a resume reads
# them from the checkpoint; a LoRA base and a latent run's autoencoder are
# checked by fingerprint instead), machine paths, and compute settings that
# leave the state as it is.
FREE = ("model.pretrained", "model.pretrained_pipeline", "model.autoencoder",
        "model.dtype", "model.remat", "model.lora.dropout",
        "model.lora.base_dtype", "text.pretrained", "text.tokenizer")


def _fixed(key: str, kind: str) -> bool:
  if key in FREE:
    return False
  return any(key.startswith(f) if f.endswith(".") else key == f
             for f in FIXED[kind])


def flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _normalised(config_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """Flat {key: value} with tuples as lists, as JSON stores them."""
  return flatten(json.loads(json.dumps(config_dict, default=str)))


def _view(flat: Mapping[str, Any], key: str):
  value = flat[key]
  if key == "optim.grad_clip_norm":  # only on/off changes the state
    return bool(value and value > 0)
  return value


def config_changes(saved: Mapping[str, Any], new: Mapping[str, Any],
                   kind: str = "diffusion") -> Tuple[List[str], List[str]]:
  """(fixed keys that differ, other keys that differ), each as "key: saved
  -> new" lines. Keys new since the run started count as free."""
  saved, new = _normalised(saved), _normalised(new)
  fixed, free = [], []
  for key in sorted(set(saved) & set(new)):
    if saved[key] == new[key]:
      continue
    line = f"{key}: {saved[key]!r} -> {new[key]!r}"
    state_shaping = _fixed(key, kind) or (
        key == "optim.grad_clip_norm"
        and _view(saved, key) != _view(new, key))
    (fixed if state_shaping else free).append(line)
  return fixed, free


def check_resume(saved: Mapping[str, Any], new: Mapping[str, Any],
                 workdir: str, step: int, kind: str = "diffusion"):
  """Raises ResumeMismatchError listing the state-shaping fields the new
  config changes; logs the other changes, which a resume takes."""
  fixed, free = config_changes(saved, new, kind)
  if fixed:
    raise errors.ResumeMismatchError(
        f"{workdir} holds a run (latest checkpoint: step {step}) that a "
        f"resume cannot change in {len(fixed)} setting(s): "
        + "; ".join(fixed) + ". To resume it, keep the run's values; for a "
        "new run, give another --workdir (add --config.training.init_from="
        f"{workdir} to start it from this run's weights, where the "
        "parameter shapes stay the same).")
  for line in free:
    logging.info("Resuming with a changed setting: %s", line)
