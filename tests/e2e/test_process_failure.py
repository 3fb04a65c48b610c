"""One failing process stops a multi-process run within seconds.

Two processes form a jax.distributed group on this machine (gloo on CPU);
one fails while the other waits for it in a collective. Without
parallel.leave_process_group the failed one sat in JAX's exit barrier and
the other in its collective until the barrier timed out (300 s), then both
aborted with C++ stacks.
"""
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from jaxsd import parallel

import helpers

ROOT = helpers.ROOT  # the repository

# The command's way out (cli: a one-line error, exit 1) around a main whose
# process FAIL raises while the others enter a collective.
WORKER = textwrap.dedent("""
    import os
    from absl import app
    from jaxsd import errors, parallel
    from jaxsd.commands import cli

    def main(argv):
      parallel.maybe_initialize_distributed("auto")
      import jax
      parallel.any_process(False)  # all are up
      if jax.process_index() == int(os.environ["FAIL"]):
        if os.environ["HOW"] == "jaxsd_error":
          raise errors.ConfigError("data.name='x' is not a dataset; fix it")
        raise FileExistsError("Cannot rename incomplete.1: exists")
      parallel.any_process(False)  # waits for the failed process
      print("UNREACHABLE", flush=True)

    app.run(cli._explaining(main))
    """)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two(fail: int, how: str, timeout: float = 90):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "JAX_", "XLA_FLAGS"))}
  env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", FAIL=str(fail), HOW=how,
             JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
             JAX_NUM_PROCESSES="2", TF_CPP_MIN_LOG_LEVEL="2")
  procs = [subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT,
                            env={**env, "JAX_PROCESS_ID": str(i)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  start = time.monotonic()
  results = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=max(1, timeout - (time.monotonic()
                                                       - start)))
      results.append((p.returncode, out))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return results


def _error_lines(out: str):
  return [line for line in out.splitlines() if line.startswith("jaxsd: error")]


@pytest.mark.parametrize("fail", [1, 0])  # 0 hosts the coordination service
def test_a_one_line_error_stops_the_other_process_with_that_line(fail):
  results = _run_two(fail, "jaxsd_error")
  assert [rc for rc, _ in results] == [1, 1], results
  line = "data.name='x' is not a dataset; fix it"
  assert _error_lines(results[fail][1]) == [f"jaxsd: error: {line}"]
  assert _error_lines(results[1 - fail][1]) == [
      f"jaxsd: error: process {fail} of 2 failed: {line}"]


def test_a_traceback_stops_the_other_process_with_its_last_line():
  results = _run_two(0, "traceback")
  assert [rc for rc, _ in results] == [1, 1], results
  assert "Traceback" in results[0][1]
  assert _error_lines(results[1][1]) == [
      "jaxsd: error: process 0 of 2 failed: FileExistsError: Cannot rename "
      "incomplete.1: exists"]


def test_leaving_is_a_no_op_outside_a_process_group():
  assert parallel.leave_process_group("anything") is None
