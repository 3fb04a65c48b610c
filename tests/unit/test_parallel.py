"""Data parallelism's shardings, the CPU device split and the SLURM
launcher (with stand-ins for srun, scancel and scontrol). Runs on several
devices and processes: tests/e2e/test_parallel_runs.py."""
import os
import shlex
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from jaxsd import parallel

import helpers

ROOT = helpers.ROOT
LAUNCHER = os.path.join(ROOT, "launch", "slurm_train.sh")


def test_state_shardings_split_largest_divisible_axis():
  mesh = parallel.make_mesh()  # this process's devices; model axis 1
  assert mesh.axis_names == (parallel.DATA_AXIS, parallel.MODEL_AXIS)
  spec = parallel.array_spec
  assert spec((3, 3, 32, 64), 4, 1024) == jax.sharding.PartitionSpec(
      None, None, None, "model")
  assert spec((64, 6), 2, 100) == jax.sharding.PartitionSpec("model", None)
  assert spec((64, 6), 2, 1000) == jax.sharding.PartitionSpec()  # small
  assert spec((3, 5), 2, 1) == jax.sharding.PartitionSpec()  # indivisible
  assert spec((), 2, 0) == jax.sharding.PartitionSpec()
  tree = {"w": jax.ShapeDtypeStruct((8, 4096), np.float32)}
  shardings = parallel.state_shardings(tree, mesh)
  assert shardings["w"].is_fully_replicated  # model axis 1: data parallel


# --- SLURM launcher -------------------------------------------------------


def _launcher(*args, **env):
  clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  return subprocess.run(["bash", LAUNCHER, *args], cwd=ROOT,
                        env={**clean, **env}, capture_output=True, text=True,
                        timeout=60)


def test_dry_run_prints_srun_command():
  out = _launcher("configs/mnist.py", "--config.training.batch_size=256",
                  DRY_RUN="1", SLURM_NNODES="2", SLURM_GPUS_PER_NODE="a100:4",
                  SLURM_CPUS_PER_TASK="8")
  assert out.returncode == 0, out.stderr
  assert shlex.split(out.stdout) == [
      "srun", "--nodes=2", "--ntasks-per-node=4", "--kill-on-bad-exit=1",
      "--cpus-per-task=8", "python", "-u", "-m", "jaxsd.main",
      "--config=configs/mnist.py", f"--workdir={ROOT}/runs/mnist",
      "--config.training.batch_size=256"]


def test_dry_run_one_process_per_node():
  out = _launcher("configs/mnist.py", DRY_RUN="1", PROCESSES="per-node",
                  SLURM_NNODES="3", SLURM_GPUS_PER_NODE="4",
                  WORKDIR="/shared/runs/x")
  assert out.returncode == 0, out.stderr
  assert shlex.split(out.stdout) == [
      "JAX_LOCAL_DEVICE_IDS=0,1,2,3", "srun", "--nodes=3",
      "--ntasks-per-node=1", "--kill-on-bad-exit=1", "python", "-u", "-m",
      "jaxsd.main", "--config=configs/mnist.py", "--workdir=/shared/runs/x"]


def test_launcher_without_config_fails():
  out = _launcher(DRY_RUN="1")
  assert out.returncode == 2 and "usage" in out.stderr


def test_launcher_forwards_time_limit_signal_and_requeues(tmp_path):
  """With stand-ins for srun, scancel and scontrol: USR1 (SLURM's warning
  before the time limit) makes the script SIGTERM the training processes,
  wait for them to stop, then requeue the job."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  scripts = {
      # srun: drop the options, run the command (the "task").
      "srun": 'while [[ $1 == --* ]]; do shift; done; exec "$@"',
      "scancel": f'echo "scancel $*" >> {tmp_path}/calls; '
                 f'kill -TERM "$(cat {tmp_path}/task.pid)"',
      "scontrol": f'echo "scontrol $*" >> {tmp_path}/calls',
      # The training process: checkpoints (here: notes it) on SIGTERM.
      "fake_python": f'echo $$ > {tmp_path}/task.pid; '
                     f'trap "echo stopped > {tmp_path}/task.out; exit 0" TERM; '
                     'while true; do sleep 0.1; done'}
  for name, body in scripts.items():
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  env.update(PATH=f"{bin_dir}:{env['PATH']}", PYTHON=str(bin_dir / "fake_python"),
             SLURM_JOB_ID="42", SLURM_NNODES="1", SLURM_GPUS_PER_NODE="1",
             WORKDIR=str(tmp_path / "run"))
  proc = subprocess.Popen(["bash", LAUNCHER, "configs/tiny.py"], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 30
  while not (tmp_path / "task.pid").exists() and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(0.2)  # the script reaches `wait`
  proc.send_signal(signal.SIGUSR1)
  _, stderr = proc.communicate(timeout=30)
  assert proc.returncode == 0, stderr
  assert (tmp_path / "task.out").read_text().strip() == "stopped"
  assert (tmp_path / "calls").read_text().splitlines() == [
      "scancel --signal=TERM 42", "scontrol requeue 42"]


def test_launcher_passes_bash_syntax_check():
  subprocess.run(["bash", "-n", LAUNCHER], check=True)


def test_launcher_passes_shellcheck():
  if shutil.which("shellcheck") is None:
    if os.environ.get("CI"):
      pytest.fail("shellcheck is not installed (apt-get install shellcheck)")
    pytest.skip("shellcheck not installed")
  out = subprocess.run(["shellcheck", LAUNCHER], capture_output=True,
                       text=True)
  assert out.returncode == 0, out.stdout


def test_cpu_devices_flag_respects_the_users_choice():
  assert (parallel.xla_flags_with_cpu_devices("", 2)
          == "--xla_force_host_platform_device_count=2")
  assert (parallel.xla_flags_with_cpu_devices("--xla_dump_to=/tmp/x", 2)
          == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2")
  mine = "--xla_force_host_platform_device_count=4"
  assert parallel.xla_flags_with_cpu_devices(mine, 2) == mine


def test_cpu_devices_ignored_once_jax_is_running(monkeypatch, caplog):
  jax.devices()  # backends initialised
  monkeypatch.setenv("XLA_FLAGS", "")
  parallel.split_cpu_into_devices(2)
  assert os.environ["XLA_FLAGS"] == ""
  assert "ignored" in caplog.text
