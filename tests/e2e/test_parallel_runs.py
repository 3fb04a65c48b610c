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
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
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


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
  """One process with 4 devices: data parallel, stopped by SIGTERM after
  step 2, then resumed with FSDP (2 x 2 mesh) to step 4, in one workdir."""
  workdir = str(tmp_path_factory.mktemp("four_devices"))
  _run_workers({"train": [
      {"workdir": workdir, "tag": "dp", "overrides": NO_EVAL,
       "sigterm_at": [0, 2]},
      {"workdir": workdir, "tag": "fsdp", "overrides": FSDP}]},
               os.path.join(workdir, "logs"), devices=4)
  return workdir


@pytest.mark.mnist
def test_four_devices_match_one_device(four_devices, reference):
  ref_workdir, ref_states = reference
  dp, fsdp = _result(four_devices, "dp"), _result(four_devices, "fsdp")
  assert dp["devices"] == 4 and dp["step"] == 2 and dp["split"] == 0
  assert fsdp["step"] == 4
  # FSDP: all but the small arrays split, each device holding half of each.
  assert fsdp["split_elements"] > 0.99 and fsdp["max_share"] == 0.5
  _assert_same_metrics(four_devices, ref_workdir)
  # Checkpoints saved with 4 devices restore on this process's one device.
  for step in (2, 4):
    state, _ = worker.restore_state(four_devices, {}, step)
    _assert_close(worker.state_leaves(state), ref_states[step])


@pytest.mark.mnist
def test_four_device_checkpoints_restore_on_two(four_devices, tmp_path):
  """The data-parallel checkpoint restores FSDP-split, the FSDP one
  replicated; both bit-exact against a one-device restore."""
  jobs = [{"workdir": four_devices, "step": 2, "overrides": FSDP,
           "out": str(tmp_path / "2.npz")},
          {"workdir": four_devices, "step": 4, "out": str(tmp_path / "4.npz")}]
  _run_workers({"restore": jobs}, str(tmp_path / "logs"), devices=2)
  for step in (2, 4):
    expected = worker.state_leaves(
        worker.restore_state(four_devices, {}, step)[0])
    with np.load(tmp_path / f"{step}.npz") as saved:
      assert int(saved["step"]) == step
      restored = [saved[f"leaf_{i}"] for i in range(len(expected))]
    _assert_close(restored, expected, rtol=0, atol=0)


@pytest.mark.mnist
def test_two_processes_stop_together_resume_and_evaluate(reference, tmp_path):
  """Two processes (one device each, gloo collectives): SIGTERM reaches only
  process 1 after step 1; both checkpoint at step 2 and stop; restarted, they
  resume to step 4 with the one-device run's parameters, and evaluate at
  step 4 (both sample, process 0 scores): eval/* is logged once, in the
  run's one MLflow run, and equals a single-process evaluation of the same
  checkpoint with the same key.

  The processes start on an empty TFDS data folder, as a fresh cluster's
  first job: one builds MNIST under the file lock while the other waits,
  then both read it (unlocked, both built it and one died renaming its copy
  into place)."""
  from jaxsd.checkpointing import run_config  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import setup as build  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import generate  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import task as diffusion_task  # pylint: disable=g-import-not-at-top
  from jaxsd.evaluation import evaluator as evaluator_lib  # pylint: disable=g-import-not-at-top
  ref_workdir, ref_states = reference
  workdir = str(tmp_path / "run")
  logs = str(tmp_path / "logs")
  data_dir = str(tmp_path / "tfds")
  # Ten samples (the least prompt_accuracy takes; diversity takes 20) keep
  # the two evaluations short: what is compared is one with the other.
  job = {"workdir": workdir, "overrides": {
      "parallel.distributed": "on", "data.tfds_data_dir": data_dir,
      "eval.metrics": ["prompt_accuracy", "fid_mnist"],
      "eval.num_samples": 10, "eval.chunk_size": 10}}
  _run_workers({"train": [{**job, "overrides": {**job["overrides"], **NO_EVAL},
                           "tag": "stopped", "sigterm_at": [1, 1]}]},
               logs, processes=2)
  for process in (0, 1):
    result = _result(workdir, "stopped", process)
    assert result["processes"] == 2 and result["step"] == 2
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
  built = []
  for name in sorted(os.listdir(logs)):  # worker_0.log, worker_1.log
    with open(os.path.join(logs, name)) as f:
      built.append("Building mnist" in f.read())
  assert sorted(built) == [False, True]  # prepared once, by one process
  assert not [f for f in os.listdir(os.path.join(data_dir, "mnist"))
              if f.startswith("incomplete")]

  # The resume evaluates (the tiny config's metrics at its last step).
  _run_workers({"train": [{**job, "tag": "resumed"}]}, logs, processes=2)
  assert [_result(workdir, "resumed", p)["step"] for p in (0, 1)] == [4, 4]
  state, _ = worker.restore_state(workdir, {}, 4)
  _assert_close(worker.state_leaves(state), ref_states[4])
  # Both starts log into one MLflow run.
  run = _assert_same_metrics(workdir, ref_workdir)
  assert run.info.status == "FINISHED"

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
