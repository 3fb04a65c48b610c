"""The eval.* section of a run's config: sample counts and the metrics
(`evaluator.check_config`: their names, their data sources and each one's
minimum of samples); and the --metrics flag of jaxsd.commands.evaluate.
"""
from jaxsd.checks import check_int
from jaxsd.errors import ConfigError
from jaxsd.evaluation import classifier
from jaxsd.evaluation import evaluator
from jaxsd.evaluation import metrics as metrics_lib
from jaxsd.evaluation.metrics import val_loss


def check_eval(config):
  """eval.*: sample counts and sizes; the metrics, when any, as the
  Evaluator will check them (reads a prompts file's lines at most)."""
  e = config.eval
  check_int("eval.num_samples", e.num_samples, 1)
  check_int("eval.chunk_size", e.chunk_size, 1,
            hint="images per jitted sampling call")
  check_int("eval.num_clip_samples", e.num_clip_samples, 1)
  check_int("eval.inception_reference_samples", e.inception_reference_samples,
            2, hint="a covariance needs at least 2 images")
  # (absent from configs saved before val_loss: its defaults)
  check_int("eval.val_loss_examples",
            e.get("val_loss_examples", val_loss.DEFAULT_EXAMPLES), 1,
            hint="held-out examples val_loss scores")
  check_int("eval.val_loss_timesteps",
            e.get("val_loss_timesteps", val_loss.DEFAULT_TIMESTEPS), 1,
            config.diffusion.num_timesteps,
            hint="fixed timesteps val_loss scores at, at most "
                 f"diffusion.num_timesteps={config.diffusion.num_timesteps}")
  if e.metrics:
    evaluator.check_config(config)
    check_sample_size(config)


def check_sample_size(config):
  """The MNIST-classifier metrics judge 28x28 or 32x32 digits only
  (`classifier.as_model_input`): refused at start, not at the first
  evaluation, when sampling.height / sampling.width make other images.
  (data.image_size's own squares are judged as the data, as before.)"""
  judged = [m for m in config.eval.metrics
            if m in classifier.CLASSIFIER_METRICS]
  s, size = config.sampling, config.data.image_size
  if not (s.get("height", 0) or s.get("width", 0)):
    return  # data.image_size's squares: judged as the data (at evaluation)
  height, width = s.get("height", 0) or size, s.get("width", 0) or size
  if judged and (height, width) not in ((28, 28), (32, 32)):
    raise ConfigError(
        f"sampling.height={s.get('height', 0)} and sampling.width="
        f"{s.get('width', 0)} sample {height}x{width} images (0 = "
        f"data.image_size={size}), but eval.metrics {judged} judge 28x28 or "
        "32x32 digits only; sample one of those sizes or remove them from "
        "eval.metrics.")


def check_metrics_flag(metrics):
  """--metrics: one or more registered metric names."""
  names = metrics_lib.metric_names()
  unknown = [m for m in metrics if m not in names]
  if unknown or not metrics:
    raise ConfigError(f"--metrics={','.join(metrics)}: metrics must be "
                      f"one or more of {names}"
                      + (f"; unknown: {unknown}." if unknown else "."))
