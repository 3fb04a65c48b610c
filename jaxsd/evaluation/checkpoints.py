"""Evaluating a saved run's checkpoints and comparing them in a table.

- `evaluate_checkpoints(workdir, steps, ...)`: {"step": ..., metric: value}
  per checkpoint step (FID, CLIP score, prompt accuracy, diversity,
  validation loss: the run's eval.metrics or those given).
- `write_tables(results, out_dir)`: out_dir/checkpoints.{csv,md}, a row per
  checkpoint.
- `evaluate_run(workdir, ...)`: what `jaxsd-evaluate` does: the steps asked
  for, evaluated, tabled in WORKDIR/eval/ and logged to the run's MLflow run.
"""
import csv
import os
from typing import Callable, Dict, List, Optional

# Columns of the comparison table, in order.
TABLE_KEYS = ("step", "prompt_accuracy", "fid_mnist", "diversity",
              "fid_inception", "clip_score", "val_loss", "seconds")


def check_flags(*, num_samples=None, metrics=None, sampler=None,
                sampler_steps=None, guidance_scale=None,
                guidance_interval=None, seed=None, steps=None):
  """The flags' own ranges (ConfigError naming the flag), before the
  workdir is read; evaluate_checkpoints checks them against the run."""
  from jaxsd import config_checks  # pylint: disable=g-import-not-at-top
  config_checks.check_sampling_flags(
      num_samples=num_samples, metrics=metrics, sampler=sampler,
      steps=sampler_steps, guidance_scale=guidance_scale,
      guidance_interval=guidance_interval, seed=seed)
  for step in steps or ():
    config_checks.check_int("--step", step, 0, hint="a checkpoint step")


def evaluate_checkpoints(workdir: str, steps: Optional[List[int]] = None, *,
                         num_samples=None, metrics=None, sampler=None,
                         sampler_steps=None, guidance_scale=None,
                         guidance_interval=None, seed=0, use_ema=True,
                         skip_unreadable: bool = False,
                         on_result: Optional[Callable[[Dict[str, float]],
                                                      None]] = None
                         ) -> List[Dict[str, float]]:
  """Evaluates the given checkpoint steps (default: latest) of a run.

  In a multi-process run every process samples its share and process 0
  scores; the others return []. on_result(result) is called on process 0
  as each checkpoint is scored. skip_unreadable: a damaged checkpoint is
  skipped with a warning naming it (CheckpointError if none reads), else
  it is a CheckpointError naming the readable ones.

  Raises:
    NothingToEvaluateError: none of the metrics can run here (before any
      checkpoint is read or image generated).
  """
  check_flags(num_samples=num_samples, metrics=metrics, sampler=sampler,
              sampler_steps=sampler_steps, guidance_scale=guidance_scale,
              guidance_interval=guidance_interval, seed=seed, steps=steps)
  # pylint: disable=g-import-not-at-top
  import jax
  from absl import logging
  from jaxsd import config_checks
  from jaxsd import errors
  from jaxsd import parallel
  from jaxsd.checkpointing import checkpoints as checkpoint
  from jaxsd.checkpointing import run_config
  from jaxsd.diffusion import generate
  from jaxsd.diffusion import setup as build
  from jaxsd.evaluation import evaluator as evaluator_lib
  # pylint: enable=g-import-not-at-top
  config = run_config.load_run_config(workdir)
  with config.unlocked():
    if num_samples is not None:
      config.eval.num_samples = num_samples
    if metrics is not None:
      config.eval.metrics = tuple(metrics)
  # The flags against the run (its schedule; each metric's minimum number
  # of samples), before any checkpoint is read.
  config_checks.check_flags_against_run(config, steps=sampler_steps)
  evaluator = evaluator_lib.Evaluator(
      config, num_samples_key=("--num_samples" if num_samples is not None
                               else "eval.num_samples"))
  mngr = checkpoint.manager(workdir, read_only=True)
  available = mngr.all_steps()
  mngr.close()
  if steps is None:
    if not available:
      checkpoint.latest_step_or_raise(checkpoint.manager(workdir,
                                                         read_only=True))
    steps = [max(available)]
  missing = [s for s in steps if s not in available]
  if missing:
    raise FileNotFoundError(f"No checkpoint for steps {missing} in {workdir}; "
                            f"available: {available or 'none'}.")
  mesh = parallel.make_mesh()
  if not evaluator_lib.any_metric_runs(evaluator):  # process 0 prepares
    raise errors.NothingToEvaluateError(
        f"{evaluator_lib.nothing_runs_message(evaluator)}; make their "
        "weights available, or choose others with --metrics (known: "
        f"{', '.join(evaluator_lib.metric_names())}).")
  results = []
  generator = None
  skipped = []
  for step in steps:
    try:
      _, comps, params, _ = build.restore_for_inference(
          workdir, mesh, step=step, use_ema=use_ema)
    except errors.CheckpointError as e:
      if not skip_unreadable:
        raise
      logging.warning("Skipping checkpoint step %d, which cannot be read: "
                      "%s", step, checkpoint.first_line(e))
      skipped.append(step)
      continue
    if generator is None:
      generator = generate.Generator.from_config(
          comps, mesh, config.sampling, chunk_size=config.eval.chunk_size,
          sampler=sampler, num_steps=sampler_steps,
          guidance_scale=guidance_scale, guidance_interval=guidance_interval)
    out = evaluator_lib.evaluate_params(evaluator, generator, params,
                                        jax.random.key(seed))
    if out is not None:
      result = {"step": step, **out}
      results.append(result)
      logging.info("Checkpoint step %d: %s", step, ", ".join(
          f"{k}={v:.4g}" for k, v in out.items() if "/" not in k))
      if on_result is not None:
        on_result(result)
  if skipped and len(skipped) == len(steps):
    raise errors.CheckpointError(
        f"None of the checkpoints {skipped} in {workdir} can be read (see "
        "the warnings above); train again, or restore them from a copy.")
  if skipped:
    logging.warning("Skipped unreadable checkpoints %s; scored %s.", skipped,
                    [s for s in steps if s not in skipped])
  return results


def write_tables(results: List[Dict[str, float]], out_dir: str):
  """checkpoints.csv and checkpoints.md: one row per checkpoint."""
  os.makedirs(out_dir, exist_ok=True)
  keys = [k for k in TABLE_KEYS if any(k in r for r in results)]
  keys += sorted({k for r in results for k in r} - set(keys))
  csv_path = os.path.join(out_dir, "checkpoints.csv")
  with open(csv_path + ".tmp", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    for r in results:
      w.writerow({k: r.get(k, "") for k in keys})
  os.replace(csv_path + ".tmp", csv_path)
  short = [k for k in keys if "/" not in k]
  lines = ["| " + " | ".join(short) + " |",
           "|" + "---|" * len(short)]
  for r in results:
    cells = [("" if k not in r else str(r[k]) if k == "step"
              else f"{r[k]:.4g}") for k in short]
    lines.append("| " + " | ".join(cells) + " |")
  md_path = os.path.join(out_dir, "checkpoints.md")
  with open(md_path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return csv_path, md_path


def log_to_mlflow(workdir: str, results: List[Dict[str, float]],
                  tables=()):
  """eval/<metric> of each result at its step, and the `tables` files as
  artifacts under eval/, in the run's MLflow run (its status kept)."""
  # pylint: disable=g-import-not-at-top
  from jaxsd.checkpointing import run_config
  from jaxsd.tracking import mlflow_store
  # pylint: enable=g-import-not-at-top
  config = run_config.load_run_config(workdir)
  writer = mlflow_store.MlflowWriter(workdir, config.logging.experiment_name,
                                     mark_running=False)
  for r in results:
    writer.write_scalars(r["step"], {f"eval/{k}": v for k, v in r.items()
                                     if k != "step"})
  for path in tables:
    writer.log_artifact(path, "eval")


def evaluate_run(workdir: str, *, all_checkpoints: bool = False,
                 step: Optional[int] = None, mlflow: bool = True,
                 num_samples=None, metrics=None, sampler=None,
                 sampler_steps=None, guidance_scale=None,
                 guidance_interval=None, seed=0, use_ema=True,
                 on_result: Optional[Callable[[Dict[str, float]], None]] = None
                 ) -> Optional[List[Dict[str, float]]]:
  """`jaxsd-evaluate`: joins the other processes of a multi-process launch,
  evaluates every checkpoint (all_checkpoints: a damaged one is skipped
  with a warning), `step`, or the latest, and on process 0 writes
  WORKDIR/eval/checkpoints.{csv,md} and (mlflow) logs them to the run's
  MLflow run. on_result(result) is called on process 0 as each checkpoint
  is scored, before anything is written.

  Returns the results on process 0 (see `evaluate_checkpoints`), None on
  the others.

  Raises:
    NotWritableError: WORKDIR/eval cannot be written (after the results
      were handed to on_result and logged).
  """
  # pylint: disable=g-import-not-at-top
  import jax
  from absl import logging
  from jaxsd import parallel
  from jaxsd.checkpointing import checkpoints as checkpoint
  from jaxsd.errors import ConfigError
  from jaxsd.errors import NotWritableError
  # pylint: enable=g-import-not-at-top
  if all_checkpoints and step is not None:
    raise ConfigError("Give --all_checkpoints or --step, not both.")
  parallel.maybe_initialize_distributed("auto")
  check_flags(num_samples=num_samples, metrics=metrics, sampler=sampler,
              sampler_steps=sampler_steps, guidance_scale=guidance_scale,
              guidance_interval=guidance_interval, seed=seed,
              steps=None if step is None else [step])
  steps = None
  if all_checkpoints:
    mngr = checkpoint.manager(workdir, read_only=True)
    steps = mngr.all_steps()
    if not steps:
      checkpoint.latest_step_or_raise(mngr)
  elif step is not None:
    steps = [step]
  results = evaluate_checkpoints(
      workdir, steps, num_samples=num_samples, metrics=metrics,
      sampler=sampler, sampler_steps=sampler_steps,
      guidance_scale=guidance_scale, guidance_interval=guidance_interval,
      seed=seed, use_ema=use_ema, skip_unreadable=all_checkpoints,
      on_result=on_result)
  if jax.process_index() != 0:
    return None
  out_dir = os.path.join(workdir, "eval")
  try:
    tables = write_tables(results, out_dir)
  except OSError as e:
    raise NotWritableError(
        f"Cannot write the evaluation tables to {out_dir} "
        f"({type(e).__name__}: {e.strerror or e}); the results above were "
        "not saved there nor logged to MLflow. Make that folder writable (or "
        "free space) and evaluate again, or keep the printed results.") from None
  if mlflow:
    log_to_mlflow(workdir, results, tables)
  logging.info("Wrote %s and %s", *tables)
  return results
