"""The training.* and optim.* sections of a run's config: their valid ranges.

Read by both trainers (diffusion and autoencoder); `jaxsd.config_checks`
runs them with the other sections before anything is built.
"""
from jaxsd.checks import INT64, check_float, check_int
from jaxsd.errors import ConfigError
from jaxsd.training import state as ts


def check_training(config):
  """training.*: step counts and intervals, each a multiple of
  training.steps_per_call (a fused call cannot stop or log inside)."""
  t = config.training
  for key in ("num_steps", "batch_size", "log_every", "eval_every",
              "checkpoint_every", "steps_per_call"):
    check_int(f"training.{key}", t[key], 1)
  keep = t.get("keep_checkpoints", None)
  if keep is not None:
    check_int("training.keep_checkpoints", keep, 1,
              hint="or None to keep every checkpoint")
  check_int("training.seed", t.seed, *INT64, hint="it seeds jax.random.key")
  if t.num_steps % t.steps_per_call:
    raise ConfigError(
        f"training.num_steps={t.num_steps} must be a multiple "
        f"of training.steps_per_call={t.steps_per_call}.")
  for key in ("log_every", "eval_every", "checkpoint_every"):
    if t[key] % t.steps_per_call:
      raise ConfigError(
          f"training.{key}={t[key]} must be a multiple of "
          f"training.steps_per_call={t.steps_per_call}.")


def check_optim(config):
  """optim.*: the optimiser (AdamW or Adafactor, the moments' dtype), its schedule, clipping, EMA and gradient accumulation
  (the micro-batches split training.batch_size)."""
  o = config.optim
  for key, allowed in (("optimizer", ts.OPTIMIZERS),
                       ("moment_dtype", ts.MOMENT_DTYPES)):
    value = o.get(key, allowed[0])
    if value not in allowed:
      raise ConfigError(f"optim.{key}={value!r}; choose one of "
                        f"{list(allowed)}.")
  if o.get("optimizer", "adamw") == "adafactor" and o.get(
      "moment_dtype", "float32") != "float32":
    raise ConfigError(
        "optim.moment_dtype applies to AdamW; Adafactor keeps no first "
        "moment and a factored second one. Set optim.moment_dtype="
        "'float32' or optim.optimizer='adamw'.")
  check_float("optim.learning_rate", o.learning_rate, 0.0, low_open=True,
              hint="a rate <= 0 does not descend the loss")
  check_int("optim.warmup_steps", o.warmup_steps, 0)
  check_float("optim.end_learning_rate_factor", o.end_learning_rate_factor,
              0.0, 1.0, hint="the cosine decays to learning_rate * this")
  check_float("optim.b1", o.b1, 0.0, 1.0, high_open=True)
  check_float("optim.b2", o.b2, 0.0, 1.0, high_open=True)
  check_float("optim.eps", o.eps, 0.0, low_open=True)
  check_float("optim.weight_decay", o.weight_decay, 0.0)
  check_float("optim.grad_clip_norm", o.grad_clip_norm, 0.0,
              hint="0 disables clipping")
  check_float("optim.ema_decay", o.ema_decay, 0.0, 1.0, high_open=True,
              hint="0 = no averaging")
  check_int("optim.grad_accum_steps", o.grad_accum_steps, 1)
  if config.training.batch_size % o.grad_accum_steps:
    raise ConfigError(
        f"training.batch_size={config.training.batch_size} must be a multiple "
        f"of optim.grad_accum_steps={o.grad_accum_steps} (the micro-batches "
        "split the global batch).")
