"""Downloads and the offline case: fail in seconds, not after minutes.

Data, text and evaluation code all fetch files (MNIST, tokenizers, metric
weights), so these helpers sit below all of them and import no jaxsd package
but `environment`.
"""
import functools
import hashlib
import logging
import os
import socket
import tempfile
import urllib.parse
import urllib.request

from jaxsd import environment

OFFLINE = "JAXSD_OFFLINE"


class WeightsUnavailableError(RuntimeError):
  """Pretrained weights are neither on disk nor downloadable now.

  Metrics that need published weights (Inception for FID, CLIP) raise it so
  the evaluator can skip the metric with one log line.
  """


def host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
  """Whether a TCP connection to host:port opens within `timeout` seconds."""
  try:
    with socket.create_connection((host, port), timeout=timeout):
      return True
  except OSError:
    return False


@functools.lru_cache(maxsize=None)
def network_available(host: str, port: int = 443, timeout: float = 3.0) -> bool:
  """True if a TCP connection to host:port opens within `timeout` seconds
  (asked once per process: the answer gates slow download attempts)."""
  return host_reachable(host, port, timeout)


def offline_mode(hugging_face: bool = False) -> bool:
  """Whether `$JAXSD_OFFLINE` (or, for the HF hub, its own switches) is set."""
  names = [OFFLINE]
  if hugging_face:
    names += ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"]
  return any(environment.get(name).strip().lower() in ("1", "true", "yes",
                                                       "on")
             for name in names)


def download(url: str, path: str, sha256_prefix: str = "",
             connect_timeout: float = 3.0, read_timeout: float = 60.0) -> str:
  """Downloads `url` to `path` (atomically) and checks its sha256 prefix.

  Raises:
    WeightsUnavailableError: offline, unreachable, or the transfer failed.
    ValueError: the file's sha256 does not start with `sha256_prefix`.
  """
  parsed = urllib.parse.urlparse(url)
  host = parsed.hostname
  port = parsed.port or (443 if parsed.scheme == "https" else 80)
  if offline_mode() or not host_reachable(host, port, connect_timeout):
    raise WeightsUnavailableError(f"cannot download {url}: {host} is not "
                                  "reachable (offline)")
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, suffix=".part")
  digest = hashlib.sha256()
  logging.info("downloading %s to %s", url, path)
  try:
    with os.fdopen(fd, "wb") as f:
      # read_timeout bounds each blocking read, so a stalled transfer ends.
      with urllib.request.urlopen(url, timeout=read_timeout) as response:
        while chunk := response.read(1 << 20):
          f.write(chunk)
          digest.update(chunk)
    if not digest.hexdigest().startswith(sha256_prefix):
      raise ValueError(f"{url}: sha256 {digest.hexdigest()} does not start "
                       f"with {sha256_prefix}")
    os.replace(tmp, path)
  except OSError as e:  # urllib's URLError and timeouts are OSErrors
    raise WeightsUnavailableError(f"downloading {url} failed: {e}") from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path
