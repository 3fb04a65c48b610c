"""What the processes of a run prepare on shared disk is prepared once.

Every process of a multi-process run starts on the same data folder and
cache; the first to find nothing prepared prepares under a file lock while
the others wait, then use what it wrote (jaxsd/shared_files.py). The
processes here are plain subprocesses: no jax.distributed group is needed to
race on a folder.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxsd import shared_files
from jaxsd.evaluation import fid

import helpers

ROOT = helpers.ROOT  # the repository


def _start_together(code: str, count: int, tmp_path, **env):
  """Starts `count` Pythons running `code` (after a start barrier: each
  waits until all have imported what they need); returns their outputs and
  exit codes."""
  prelude = textwrap.dedent(f"""
      import os, sys, time
      def start_together(index):
        open(os.path.join({str(tmp_path)!r}, f"ready_{{index}}"), "w").close()
        while len([f for f in os.listdir({str(tmp_path)!r})
                   if f.startswith("ready_")]) < {count}:
          time.sleep(0.01)
      """)
  procs = [subprocess.Popen(
      [sys.executable, "-c", prelude + textwrap.dedent(code), str(i)],
      cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, **env},
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(count)]
  outputs = []
  for p in procs:
    out, _ = p.communicate(timeout=300)
    outputs.append((p.returncode, out))
  return outputs


def test_prepare_once_prepares_in_one_process(tmp_path):
  code = """
      from jaxsd import shared_files
      index = int(sys.argv[1])
      marker = os.path.join(%r, "prepared")
      start_together(index)
      def prepare():
        time.sleep(0.5)  # long enough for the others to reach the lock
        with open(marker, "a") as f:
          f.write(f"{index}\\n")
      shared_files.prepare_once(marker + ".lock",
                                lambda: os.path.exists(marker), prepare)
      print("found", open(marker).read().split())
      """ % str(tmp_path)
  outputs = _start_together(code, 3, tmp_path)
  assert [rc for rc, _ in outputs] == [0, 0, 0], outputs
  assert len((tmp_path / "prepared").read_text().split()) == 1


def test_prepare_once_lets_the_next_process_prepare_after_a_failure(tmp_path):
  marker = tmp_path / "prepared"

  def failing():
    raise RuntimeError("disk full")
  with pytest.raises(RuntimeError):
    shared_files.prepare_once(str(marker) + ".lock", marker.exists, failing)
  assert shared_files.prepare_once(str(marker) + ".lock", marker.exists,
                                   marker.touch)
  assert not shared_files.prepare_once(str(marker) + ".lock", marker.exists,
                                       failing)


def test_reference_statistics_computed_by_one_of_several_processes(tmp_path):
  code = """
      import numpy as np
      from jaxsd.evaluation import fid
      index = int(sys.argv[1])
      start_together(index)
      def compute():
        time.sleep(0.5)
        with open(os.path.join(%r, "computed"), "a") as f:
          f.write(f"{index}\\n")
        return np.arange(3.0), np.eye(3)
      mu, sigma = fid.cached_statistics(%r, "net-test", compute)
      assert mu.tolist() == [0, 1, 2] and sigma.tolist() == np.eye(3).tolist()
      """ % (str(tmp_path), str(tmp_path / "cache"))
  outputs = _start_together(code, 2, tmp_path)
  assert [rc for rc, _ in outputs] == [0, 0], outputs
  assert len((tmp_path / "computed").read_text().split()) == 1
  mu, _ = fid.load_statistics(fid.statistics_cache_path(
      str(tmp_path / "cache"), "net-test"))
  np.testing.assert_array_equal(mu, [0, 1, 2])


# Two processes preparing MNIST in one empty TFDS folder: the first start of
# tests/e2e/test_parallel_runs.py::test_two_processes_stop_together_resume_and_evaluate.
