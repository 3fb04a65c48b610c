"""Evaluate a run's checkpoints: FID, CLIP score, prompt accuracy, diversity.

jaxsd-evaluate --workdir=runs/mnist [--all_checkpoints | --step=N]
    [--num_samples=1000] [--metrics=prompt_accuracy,fid_mnist,...]

Prints one JSON object per checkpoint on stdout ({"step": ..., metric: ...})
as it is scored (--all_checkpoints skips a damaged checkpoint, warning),
writes WORKDIR/eval/checkpoints.{csv,md} comparing the checkpoints, and logs
eval/* at each step (and the table) to the run's MLflow run.
"""
import json
import sys

from absl import app
from absl import flags

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from jaxsd.evaluation import checkpoints  # pylint: disable=g-import-not-at-top
  def print_result(result):  # as each checkpoint is scored
    print(json.dumps(result), file=sys.stdout, flush=True)

  checkpoints.evaluate_run(
      FLAGS.workdir, all_checkpoints=FLAGS.all_checkpoints, step=FLAGS.step,
      mlflow=FLAGS.mlflow, num_samples=FLAGS.num_samples,
      metrics=FLAGS.metrics, sampler=FLAGS.sampler, sampler_steps=FLAGS.steps,
      guidance_scale=FLAGS.guidance_scale,
      guidance_interval=FLAGS.guidance_interval, seed=FLAGS.seed,
      use_ema=FLAGS.use_ema, on_result=print_result)


def run():
  """The `jaxsd-evaluate` command."""
  cli.run(main, _define_flags)


if __name__ == "__main__":
  run()
