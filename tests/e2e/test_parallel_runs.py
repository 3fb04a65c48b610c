"""Data parallelism, FSDP and multi-process runs.

Device and process counts are fixed when JAX starts, so the runs happen in
subprocesses (tests/e2e/_parallel_worker.py) and are compared with the
one-device run of conftest's `trained_run` (tiny config, 4 steps, checkpoints
at 2 and 4). They share compiled programs through JAXSD_COMPILATION_CACHE.
"""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import helpers

from jaxsd import parallel
from jaxsd import xla_flags

import _parallel_worker as worker  # tests/e2e/ is on sys.path under pytest

ROOT = helpers.ROOT
WORKER = os.path.join(helpers.TESTS, "e2e", "_parallel_worker.py")
# Training here skips the periodic evaluation: it is not what these tests
# check, costs minutes, and Evaluator.prepare() runs on process 0 alone.
NO_EVAL = {"eval.metrics": []}
# FSDP over a model axis of 2 (so a 4-device mesh is 2 x 2); the tiny
# model's arrays are small, so shard everything from 1024 elements up.
FSDP = {"parallel.fsdp": True, "parallel.model_axis_size": 2,
        "parallel.fsdp_min_size": 1024, **NO_EVAL}
# Same global batch, different reduction order: float32 round-off, except
# in parameters whose true gradient is zero (the tiny UNet's GroupNorm has one
# channel per group, so biases and time-embedding weights feeding it cancel):
# Adam turns their round-off gradients into learning-rate-sized steps of
# either sign. The losses and gradient norms are compared tightly.
TOLERANCE = {"rtol": 2e-4, "atol": 1e-4}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(spec, log_dir, **kwargs):
  """Runs the worker script with the given jobs (see _run_processes)."""
  _run_processes([sys.executable, WORKER, json.dumps(spec)], log_dir,
                 **kwargs)


def _run_processes(argv, log_dir, *, devices=1, processes=1, timeout=600):
  """Runs the command with `devices` CPU devices in each of `processes`
  processes (one jax.distributed group on 127.0.0.1); fails with their logs."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROC",
                              "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE"))}
  # The test session's flags (tests/conftest.py) with this device count.
  env["XLA_FLAGS"] = parallel.xla_flags_with_cpu_devices(
      xla_flags.without_flag(env.get("XLA_FLAGS", ""),
                             "--xla_force_host_platform_device_count"),
      devices)
  # As jaxsd's commands start (jaxsd.commands.cli.run): transformers leaves
  # PyTorch unimported, 11-12 s -> 5 s of each worker's start (2-core AMD
  # EPYC, AVX2, 2026-12-07). The workers run jaxsd only.
  env["USE_TORCH"] = "0"
  # The worker imports `configs`, `jaxsd` and `helpers` from this checkout.
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (ROOT, helpers.TESTS, env.get("PYTHONPATH")) if p)
  if processes > 1:
    env["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{_free_port()}"
    env["JAX_NUM_PROCESSES"] = str(processes)
  os.makedirs(log_dir, exist_ok=True)
  procs, logs = [], []
  for i in range(processes):
    logs.append(os.path.join(log_dir, f"worker_{len(os.listdir(log_dir))}.log"))
    with open(logs[-1], "w") as log:
      procs.append(subprocess.Popen(
          argv, cwd=ROOT,
          env={**env, "JAX_PROCESS_ID": str(i)}, stdout=log,
          stderr=subprocess.STDOUT))
  deadline = time.time() + timeout
  try:
    codes = [p.wait(timeout=max(1, deadline - time.time())) for p in procs]
  except subprocess.TimeoutExpired:
    codes = None
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  if codes != [0] * processes:
    tails = []
    for path in logs:
      with open(path) as f:
        tails.append(f"--- {path}\n" + "".join(f.readlines()[-40:]))
    pytest.fail(f"worker exit codes {codes} (None: timed out)\n"
                + "\n".join(tails))


def _result(workdir, tag, process=0):
  with open(os.path.join(workdir, f"{tag}_{process}.json")) as f:
    return json.load(f)


def _metrics(workdir):
  """(MLflow runs, {step: (loss, grad_norm)}) of a workdir's first run."""
  client, runs = helpers.mlflow_runs(workdir)
  history = {name: {m.step: m.value for m in client.get_metric_history(
      runs[0].info.run_id, f"train/{name}")} for name in ("loss", "grad_norm")}
  return runs, {step: (loss, history["grad_norm"][step])
                for step, loss in history["loss"].items()}


def _assert_same_metrics(workdir, ref_workdir):
  """One MLflow run, logged at steps 2 and 4 with the reference's loss and
  gradient norm."""
  runs, metrics = _metrics(workdir)
  assert len(runs) == 1
  _, expected = _metrics(ref_workdir)
  assert sorted(metrics) == [2, 4]
  for step in (2, 4):
    np.testing.assert_allclose(metrics[step], expected[step], rtol=1e-5)
  return runs[0]


def _assert_close(actual, expected, **tolerance):
  assert len(actual) == len(expected)
  for i, (a, b) in enumerate(zip(actual, expected)):
    np.testing.assert_allclose(a, b, err_msg=f"state array {i}",
                               **(tolerance or TOLERANCE))


@pytest.fixture(scope="module")
def reference(trained_run):
  """The one-device run's workdir and state arrays at steps 2 and 4."""
  workdir, _ = trained_run
  return workdir, {step: worker.state_leaves(
      worker.restore_state(workdir, {}, step)[0]) for step in (2, 4)}


@pytest.mark.mnist
def test_two_processes_of_two_devices_stop_resume_evaluate_and_restore(
    reference, tmp_path):
  """A two-node job in miniature: two processes with two CPU devices each
  (one jax.distributed group over gloo, 4 devices), started on an empty
  TFDS data folder as a fresh cluster's first job. One test, not several
  sharing a fixture: pytest-xdist would run the fixture on each worker.

  First start, FSDP over a model axis of 2 (each process's two devices; the
  data axis spans the processes): SIGTERM reaches only process 1 after step
  1; both checkpoint at step 2 and stop. MNIST is prepared once, by one
  process under the file lock, while the other waits (unlocked, both built
  it and one died renaming its copy into place). Second start, data
  parallel over the 4 devices: both resume to step 4 with the one-device
  run's losses and parameters, logging into one MLflow run, and evaluate
  there (both sample, process 0 scores): eval/* is logged once and equals a
  one-process evaluation of the same checkpoint with the same key. Then the
  FSDP checkpoint restores replicated, the data-parallel one FSDP-split, on
  2 devices, bit-exact."""
  ref_workdir, ref_states = reference
  workdir, logs = str(tmp_path / "run"), str(tmp_path / "logs")
  data = {"parallel.distributed": "on",
          "data.tfds_data_dir": str(tmp_path / "tfds")}
  _run_workers({"train": [{"workdir": workdir, "tag": "fsdp",
                           "overrides": {**data, **FSDP},
                           "sigterm_at": [1, 1]}]},
               logs, devices=2, processes=2)
  for process in (0, 1):
    fsdp = _result(workdir, "fsdp", process)
    assert (fsdp["processes"], fsdp["devices"], fsdp["step"]) == (2, 4, 2)
    # All but the small arrays split, each device holding half of each.
    assert fsdp["split_elements"] > 0.99 and fsdp["max_share"] == 0.5
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
  built = []
  for name in sorted(os.listdir(logs)):  # worker_0.log, worker_1.log
    with open(os.path.join(logs, name)) as f:
      built.append("Building mnist" in f.read())
  assert sorted(built) == [False, True]  # prepared once, by one process
  assert not [f for f in os.listdir(tmp_path / "tfds" / "mnist")
              if f.startswith("incomplete")]

  # Twelve samples (prompt_accuracy takes 10 at least; diversity 20) keep
  # the evaluation short: what is compared is it with a one-process one. A
  # chunk of 12 divides over 4 devices and 1, so both draw the same noise
  # (a chunk is rounded down to a multiple of the devices, and each chunk
  # has its own key).
  evaluation = {"eval.metrics": ["prompt_accuracy", "fid_mnist"],
                "eval.num_samples": 12, "eval.chunk_size": 12}
  _run_workers({"train": [{"workdir": workdir, "tag": "dp",
                           "overrides": {**data, **evaluation}}]},
               logs, devices=2, processes=2)
  for process in (0, 1):
    dp = _result(workdir, "dp", process)
    assert dp["step"] == 4 and dp["split"] == 0
  for step in (2, 4):  # restored on this process's one device
    state, _ = worker.restore_state(workdir, {}, step)
    _assert_close(worker.state_leaves(state), ref_states[step])
  run = _assert_same_metrics(workdir, ref_workdir)
  assert run.info.status == "FINISHED"
  _assert_evaluation_reproduced(workdir, run)

  jobs = [{"workdir": workdir, "step": 2, "out": str(tmp_path / "2.npz")},
          {"workdir": workdir, "step": 4, "overrides": FSDP,
           "out": str(tmp_path / "4.npz")}]
  _run_workers({"restore": jobs}, str(tmp_path / "restore_logs"), devices=2)
  for step in (2, 4):
    expected = worker.state_leaves(worker.restore_state(workdir, {}, step)[0])
    with np.load(tmp_path / f"{step}.npz") as saved:
      assert int(saved["step"]) == step
      restored = [saved[f"leaf_{i}"] for i in range(len(expected))]
    _assert_close(restored, expected, rtol=0, atol=0)


def _assert_evaluation_reproduced(workdir, run):
  """eval/* logged once, at step 4, equal to a one-process evaluation of
  the step-4 checkpoint with the same key."""
  from jaxsd.checkpointing import run_config  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import setup as build  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import generate  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import task as diffusion_task  # pylint: disable=g-import-not-at-top
  from jaxsd.evaluation import evaluator as evaluator_lib  # pylint: disable=g-import-not-at-top
  client, _ = helpers.mlflow_runs(workdir)
  names = ("prompt_accuracy", "prompt_accuracy/7", "fid_mnist")
  logged = {}
  for name in names:
    history = client.get_metric_history(run.info.run_id, f"eval/{name}")
    assert [m.step for m in history] == [4], name
    logged[name] = history[0].value
  config = run_config.load_run_config(workdir)
  evaluator = evaluator_lib.Evaluator(config).prepare()
  mesh = parallel.make_mesh()
  _, comps, params, _ = build.restore_for_inference(
      workdir, mesh, step=4, use_ema=config.sampling.use_ema)
  generator = generate.Generator.from_config(
      comps, mesh, config.sampling, chunk_size=config.eval.chunk_size)
  metrics = evaluator_lib.evaluate_params(evaluator, generator, params,
                                          diffusion_task.eval_key(config, 4))
  for name in names:
    np.testing.assert_allclose(metrics[name], logged[name], rtol=1e-3,
                               atol=1e-4, err_msg=name)


_GATHER = """
import json, sys
from jaxsd import parallel
parallel.maybe_initialize_distributed("on")
import jax
from jaxsd.data import pipeline
k = jax.process_index()
states = pipeline._allgather_json({"process": k, "buffer": [[k, 7]] * (3 + 5 * k)})
with open(sys.argv[1] + f"/{k}.json", "w") as f:
  json.dump(states, f)
"""


def test_streamed_loader_states_gather_from_every_process(tmp_path):
  """A checkpoint of a streamed source keeps every process's loader state:
  two processes (gloo) gather JSON states of different lengths in order."""
  _run_processes([sys.executable, "-c", _GATHER, str(tmp_path)],
                 str(tmp_path / "logs"), processes=2, timeout=300)
  for k in (0, 1):
    with open(tmp_path / f"{k}.json") as f:
      states = json.load(f)
    assert [s["process"] for s in states] == [0, 1]
    assert [len(s["buffer"]) for s in states] == [3, 8]
