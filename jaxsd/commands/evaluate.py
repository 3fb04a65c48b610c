"""Evaluate a run's checkpoints: FID, CLIP score, prompt accuracy, diversity.

jaxsd-evaluate --workdir=runs/mnist [--all_checkpoints | --step=N]
    [--num_samples=1000] [--metrics=prompt_accuracy,fid_mnist,...]

Prints one JSON object per checkpoint on stdout ({"step": ..., metric: ...}),
writes WORKDIR/eval/checkpoints.{csv,md} comparing the checkpoints, and logs
eval/* at each step (and the table) to the run's MLflow run.
"""
import csv
import json
import os
import sys
from typing import Dict, List, Optional

from absl import app
from absl import flags
from absl import logging

from jaxsd.commands import cli

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string("workdir", None, "Training workdir.")
  flags.DEFINE_bool("all_checkpoints", False, "Evaluate every checkpoint.")
  flags.DEFINE_integer("step", None, "Evaluate this checkpoint step.")
  flags.DEFINE_integer("num_samples", None, "Generated images (default: the "
                       "run's eval.num_samples).")
  flags.DEFINE_list("metrics", None, "Metrics (default: the run's "
                    "eval.metrics).")
  cli.define_sampler_flags()
  flags.adopt_module_key_flags(cli)  # --help lists them as this command's
  flags.DEFINE_bool("mlflow", True, "Log to the run's MLflow run.")
  flags.mark_flags_as_required(["workdir"])


# Columns of the comparison table, in order.
TABLE_KEYS = ("step", "prompt_accuracy", "fid_mnist", "diversity",
              "fid_inception", "clip_score", "seconds")


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
                         guidance_interval=None, seed=0, use_ema=True
                         ) -> List[Dict[str, float]]:
  """Evaluates the given checkpoint steps (default: latest) of a run.

  In a multi-process run every process samples its share and process 0
  scores; the others return [].
  """
  check_flags(num_samples=num_samples, metrics=metrics, sampler=sampler,
              sampler_steps=sampler_steps, guidance_scale=guidance_scale,
              guidance_interval=guidance_interval, seed=seed, steps=steps)
  import jax  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import setup as build
  from jaxsd.checkpointing import checkpoints as checkpoint
  from jaxsd import config_checks
  from jaxsd.diffusion import generate
  from jaxsd import parallel  # pylint: disable=g-import-not-at-top
  from jaxsd.evaluation import evaluator as evaluator_lib  # pylint: disable=g-import-not-at-top
  config = build.load_run_config(workdir)
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
  if jax.process_index() == 0:  # the process that scores
    evaluator.prepare()
  results = []
  generator = None
  for step in steps:
    _, comps, params, _ = build.restore_for_inference(
        workdir, mesh, step=step, use_ema=use_ema)
    if generator is None:
      generator = generate.Generator.from_config(
          comps, mesh, config.sampling, chunk_size=config.eval.chunk_size,
          sampler=sampler, num_steps=sampler_steps,
          guidance_scale=guidance_scale, guidance_interval=guidance_interval)
    out = evaluator_lib.evaluate_params(evaluator, generator, params,
                                        jax.random.key(seed))
    if out is not None:
      results.append({"step": step, **out})
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  from jaxsd.checkpointing import checkpoints as checkpoint
  from jaxsd import parallel  # pylint: disable=g-import-not-at-top
  parallel.maybe_initialize_distributed("auto")
  if FLAGS.all_checkpoints and FLAGS.step is not None:
    raise app.UsageError("Give --all_checkpoints or --step, not both.")
  check_flags(num_samples=FLAGS.num_samples, metrics=FLAGS.metrics,
              sampler=FLAGS.sampler, sampler_steps=FLAGS.steps,
              guidance_scale=FLAGS.guidance_scale,
              guidance_interval=FLAGS.guidance_interval, seed=FLAGS.seed,
              steps=None if FLAGS.step is None else [FLAGS.step])
  steps = None
  if FLAGS.all_checkpoints:
    mngr = checkpoint.manager(FLAGS.workdir, read_only=True)
    steps = mngr.all_steps()
    if not steps:
      checkpoint.latest_step_or_raise(mngr)
  elif FLAGS.step is not None:
    steps = [FLAGS.step]
  results = evaluate_checkpoints(
      FLAGS.workdir, steps, num_samples=FLAGS.num_samples,
      metrics=FLAGS.metrics, sampler=FLAGS.sampler, sampler_steps=FLAGS.steps,
      guidance_scale=FLAGS.guidance_scale,
      guidance_interval=FLAGS.guidance_interval, seed=FLAGS.seed,
      use_ema=FLAGS.use_ema)
  if jax.process_index() != 0:
    return
  csv_path, md_path = write_tables(results, os.path.join(FLAGS.workdir,
                                                         "eval"))
  if FLAGS.mlflow:
    from jaxsd.diffusion import setup as build
    from jaxsd.tracking import mlflow_store  # pylint: disable=g-import-not-at-top
    config = build.load_run_config(FLAGS.workdir)
    writer = mlflow_store.MlflowWriter(FLAGS.workdir,
                                         config.logging.experiment_name,
                                         mark_running=False)
    for r in results:
      writer.write_scalars(r["step"], {f"eval/{k}": v for k, v in r.items()
                                       if k != "step"})
    writer.log_artifact(csv_path, "eval")
    writer.log_artifact(md_path, "eval")
  for r in results:
    print(json.dumps(r), file=sys.stdout, flush=True)
  logging.info("Wrote %s and %s", csv_path, md_path)


def run():
  """The `jaxsd-evaluate` command (`jaxsd-evaluate`)."""
  cli.run(main, _define_flags)


if __name__ == "__main__":
  run()
