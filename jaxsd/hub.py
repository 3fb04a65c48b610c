"""Downloads and the offline case: fail in seconds, not after minutes of retries."""
import functools
import socket


@functools.lru_cache(maxsize=None)
def network_available(host: str, port: int = 443, timeout: float = 3.0) -> bool:
  """True if a TCP connection to host:port opens within `timeout` seconds."""
  try:
    with socket.create_connection((host, port), timeout=timeout):
      return True
  except OSError:
    return False
