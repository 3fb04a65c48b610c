"""launch/slurm_train.sh without a cluster: nodes without GPUs, what it
refuses (DRY_RUN refuses the same), and the signals SLURM sends it.

The srun command and the time-limit requeue of GPU jobs are tested in
tests/test_parallel.py. Stand-ins for srun, scancel and scontrol record how
they were called.
"""
import os
import shlex
import signal
import subprocess
import time

import pytest

import helpers

ROOT = helpers.ROOT  # the repository
LAUNCHER = os.path.join(ROOT, "launch", "slurm_train.sh")


def _launcher(*args, **env):
  clean = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("GPUS_PER_NODE",
                                                       "PROCESSES", "NODES")}
  return subprocess.run(["bash", LAUNCHER, *args], cwd=ROOT,
                        env={**clean, **env}, capture_output=True, text=True,
                        timeout=60)


def _srun_argv(out):
  assert out.returncode == 0, out.stderr
  return shlex.split(out.stdout)


def test_cpu_nodes_start_one_process_per_task_of_the_job():
  # sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1
  out = _launcher("configs/tiny.py", DRY_RUN="1", SLURM_NNODES="1",
                  SLURM_GPUS_PER_NODE="0", SLURM_NTASKS_PER_NODE="2",
                  SLURM_CPUS_PER_TASK="1", WORKDIR="/shared/runs/t")
  assert _srun_argv(out) == [
      "srun", "--nodes=1", "--ntasks-per-node=2", "--kill-on-bad-exit=1",
      "--cpus-per-task=1", "python", "-u", "-m", "jaxsd.main",
      "--config=configs/tiny.py", "--workdir=/shared/runs/t"]


def test_a_job_without_gpus_follows_its_tasks_spread_evenly():
  # sbatch --nodes=3 --ntasks=6 (no GPU variables at all)
  out = _launcher("configs/tiny.py", DRY_RUN="1", SLURM_NNODES="3",
                  SLURM_TASKS_PER_NODE="2(x3)")
  assert _srun_argv(out)[:3] == ["srun", "--nodes=3", "--ntasks-per-node=2"]


def test_one_process_per_cpu_node_sets_no_gpu_ids():
  out = _launcher("configs/tiny.py", DRY_RUN="1", PROCESSES="per-node",
                  GPUS_PER_NODE="0", SLURM_NNODES="2",
                  SLURM_NTASKS_PER_NODE="1")
  assert _srun_argv(out)[:3] == ["srun", "--nodes=2", "--ntasks-per-node=1"]


@pytest.mark.parametrize("env, says", [
    # No GPUs and no tasks per node: srun --ntasks-per-node=0 would fail.
    ({"GPUS_PER_NODE": "0"}, "--ntasks-per-node=N"),
    # 4 GPUs but 2 tasks per node: srun would start 2 processes, not 4.
    ({"SLURM_GPUS_PER_NODE": "4", "SLURM_NTASKS_PER_NODE": "2",
      "SLURM_NNODES": "1"}, "submit with --ntasks-per-node=4"),
    # One process per node in a job of 4 tasks per node.
    ({"PROCESSES": "per-node", "SLURM_GPUS_PER_NODE": "4",
      "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "1"},
     "submit with --ntasks-per-node=1"),
    # More nodes than the job has (srun: "Only allocated 1 nodes").
    ({"NODES": "2", "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "1"},
     "the job has 1 node(s)"),
    ({"SLURM_TASKS_PER_NODE": "2,1", "SLURM_NNODES": "2"}, "unevenly"),
    ({"GPUS_PER_NODE": "four"}, "GPUS_PER_NODE=four"),
    ({"PROCESSES": "per-core", "GPUS_PER_NODE": "1"}, "per-gpu or per-node"),
])
def test_dry_run_refuses_what_the_real_run_would(env, says):
  for dry in ({"DRY_RUN": "1"}, {}):
    out = _launcher("configs/tiny.py", **env, **dry)
    assert out.returncode == 2, (dry, out.stdout, out.stderr)
    assert out.stdout == ""  # refused before printing or starting srun
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxsd: launch refused:")
    assert says in lines[0], lines[0]


def _stand_ins(tmp_path, scancel_body="", scontrol_body=""):
  """srun runs its command; scancel and scontrol record their calls, then
  run the given bodies; the "training process" notes a SIGTERM and exits
  0."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  scripts = {
      "srun": 'while [[ $1 == --* ]]; do shift; done; exec "$@"',
      "scancel": f'echo "scancel $*" >> {tmp_path}/calls; {scancel_body}',
      "scontrol": f'echo "scontrol $*" >> {tmp_path}/calls; {scontrol_body}',
      "fake_python": f'echo $$ > {tmp_path}/task.pid; '
                     f'trap "echo stopped > {tmp_path}/task.out; exit 0" TERM; '
                     'while true; do sleep 0.1; done'}
  for name, body in scripts.items():
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  env.update(PATH=f"{bin_dir}:{env['PATH']}",
             PYTHON=str(bin_dir / "fake_python"), SLURM_JOB_ID="42",
             SLURM_NNODES="1", SLURM_GPUS_PER_NODE="0",
             SLURM_NTASKS_PER_NODE="1", WORKDIR=str(tmp_path / "run"))
  proc = subprocess.Popen(["bash", LAUNCHER, "configs/tiny.py"], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 30
  while not (tmp_path / "task.pid").exists() and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(0.2)  # the script reaches `wait`
  return proc, int((tmp_path / "task.pid").read_text())


def test_sigterm_from_slurm_is_not_forwarded(tmp_path):
  """scancel, preemption and scontrol requeue signal every task
  themselves; the script's own scancel was refused then ("Job can not be
  altered now") and retried until KillWait killed the script."""
  proc, task = _stand_ins(tmp_path)
  start = time.monotonic()
  proc.send_signal(signal.SIGTERM)  # SLURM signals the script ...
  os.kill(task, signal.SIGTERM)  # ... and the task
  _, stderr = proc.communicate(timeout=30)
  assert proc.returncode == 0, stderr
  assert time.monotonic() - start < 5
  assert (tmp_path / "task.out").read_text().strip() == "stopped"
  assert not (tmp_path / "calls").exists()  # no scancel, no requeue


def test_the_requeues_own_sigterm_ends_the_script_at_once(tmp_path):
  """After the time limit's checkpoint the script requeues the job, and
  SLURM answers with SIGTERM to the script: it exits 0 without acting."""
  proc, _ = _stand_ins(
      tmp_path,
      scancel_body=f'kill -TERM "$(cat {tmp_path}/task.pid)"',
      # After scontrol requeue SLURM sends SIGTERM to the batch script.
      scontrol_body='kill -TERM "$PPID"; sleep 0.5')
  proc.send_signal(signal.SIGUSR1)
  _, stderr = proc.communicate(timeout=30)
  assert proc.returncode == 0, stderr
  assert (tmp_path / "calls").read_text().splitlines() == [
      "scancel --signal=TERM 42", "scontrol requeue 42"]
  assert "SIGTERM" not in stderr
