"""The commands, started as a user starts them, stop on a bad value with
one line naming it, in seconds, writing nothing."""
import os
import time

import helpers

NOWHERE = "/nonexistent/jaxsd_workdir"


def _train(workdir, *overrides, env=None):
  return helpers.jaxsd_command(
      "jaxsd.main", "--config=configs/tiny.py", f"--workdir={workdir}",
      *overrides, env=env)


def test_bad_value_is_one_line_in_seconds(tmp_path):
  workdir = tmp_path / "run"
  start = time.time()
  out = _train(workdir, "--config.optim.learning_rate=-1")
  assert out.returncode == 1
  assert time.time() - start < 60  # imports; no model, no data
  assert "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("jaxsd: error: optim.learning_rate=-1"), last
  assert not workdir.exists()


def test_unknown_config_key_is_named(tmp_path):
  out = _train(tmp_path, "--config.training.num_stepz=3")
  assert out.returncode != 0
  assert "num_stepz" in out.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_batch_not_divisible_by_devices(tmp_path):
  # parallel.cpu_devices splits the CPU into 3 devices before JAX starts.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = _train(tmp_path, "--config.training.batch_size=8",
               "--config.parallel.cpu_devices=3", env=env)
  assert out.returncode != 0
  assert "training.batch_size=8 must be divisible by the device count (3)" in (
      out.stderr)


def test_sample_refuses_negative_guidance_at_once():
  """The command prints the one-line error and exits 1 (it used to write
  anti-guided images)."""
  out = helpers.jaxsd_command(
      "jaxsd.commands.sample", f"--workdir={NOWHERE}", "--prompt=a 3",
      "--guidance_scale=-3", timeout=300)
  assert out.returncode == 1, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("jaxsd: error: --guidance_scale=-3.0"), last
  assert "Traceback" not in out.stderr
