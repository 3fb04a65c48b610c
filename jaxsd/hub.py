"""Downloads and the offline case: fail in seconds, not after minutes of retries."""
import functools

from jaxsd.evaluation import weights


@functools.lru_cache(maxsize=None)
def network_available(host: str, port: int = 443, timeout: float = 3.0) -> bool:
  """True if a TCP connection to host:port opens within `timeout` seconds
  (asked once per process: the answer gates slow download attempts)."""
  return weights.host_reachable(host, port, timeout)
