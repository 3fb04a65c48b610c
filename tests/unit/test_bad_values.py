"""Bad values fail in well under a second, naming the key and the range.

`config_checks.validate` on configs/tiny.py (and configs/mnist.py / the
latent config where the rule differs) with one bad value each; the flags of
jaxsd.commands.sample / jaxsd.commands.evaluate against a workdir that does not exist (the
check must come before the workdir is read); Evaluator's sample minimums.
"""
import glob
import importlib
import json
import os
import time

import ml_collections
import pytest

from jaxsd import config_checks
from jaxsd.diffusion import sample_run as sample
from jaxsd.errors import ConfigError
from jaxsd.evaluation import checkpoints as evaluate
from jaxsd.evaluation import evaluator as evaluator_lib

import helpers

NOWHERE = "/nonexistent/jaxsd_workdir"
NAN, INF = float("nan"), float("inf")


def _config(name="tiny", kind=None, **overrides):
  """configs/<name>.py's config with dotted-key overrides, rebuilt from a
  dict as a saved config.json is (so any type can be given)."""
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config() if kind is None else module.get_config(kind)
  tree = config.to_dict()
  for dotted, value in overrides.items():
    node = tree
    *parents, last = dotted.split(".")
    for part in parents:
      node = node[part]
    assert last in node, f"{dotted} is not a config key"
    node[last] = value
  return ml_collections.ConfigDict(tree)


@pytest.fixture(scope="module", autouse=True)
def _warm():
  """Runs validate once, so the timings are the checks' (not a first
  call's set-up)."""
  config_checks.validate(_config())


def _refused(fn, *args, **kwargs) -> str:
  start = time.perf_counter()
  with pytest.raises(ConfigError) as info:
    fn(*args, **kwargs)
  seconds = time.perf_counter() - start
  assert seconds < 1.0, f"took {seconds:.2f} s"
  return str(info.value)


# (dotted key, bad value[, the key the message must name when another]).
TINY_ROWS = [
    ("training.num_steps", 0),
    ("training.num_steps", -5),
    ("training.num_steps", 2.5),
    ("training.num_steps", "10"),
    ("training.batch_size", 0),
    ("training.log_every", 0),
    ("training.eval_every", -1),
    ("training.checkpoint_every", 0),
    ("training.keep_checkpoints", 0),
    ("training.steps_per_call", 0),
    ("training.steps_per_call", 3),  # 4 steps are not a multiple of 3
    ("training.seed", 1.5),
    ("training.seed", 2**64),
    ("optim.learning_rate", -1.0),
    ("optim.learning_rate", 0.0),
    ("optim.learning_rate", NAN),
    ("optim.learning_rate", INF),
    ("optim.learning_rate", "fast"),
    ("optim.learning_rate", None),
    ("optim.warmup_steps", -1),
    ("optim.end_learning_rate_factor", 1.5),
    ("optim.b1", 1.0),
    ("optim.b1", -0.1),
    ("optim.b2", 1.0),
    ("optim.eps", 0.0),
    ("optim.weight_decay", -0.01),
    ("optim.grad_clip_norm", -1.0),
    ("optim.ema_decay", 1.0),
    ("optim.ema_decay", -0.5),
    ("optim.grad_accum_steps", 0),
    ("optim.grad_accum_steps", 3),  # batch 8 does not split in 3
    ("data.image_size", 27),  # the 2-level UNet halves it once
    ("data.image_size", 0),
    ("data.num_channels", 2, "data.num_channels"),
    ("data.workers", -1),
    ("data.shuffle_buffer", 0),
    ("data.cycle_length", 0),
    ("data.max_skipped_fraction", 1.5),
    ("data.max_skipped_fraction", -0.1),
    ("data.source", "ftp"),
    ("text.max_length", 0),
    ("text.hidden_size", 0),
    ("text.num_layers", 0),
    ("text.num_heads", 3),  # 32 does not split into 3 heads
    ("text.intermediate_size", -1),
    ("model.in_channels", 0),
    ("model.block_out_channels", ()),
    ("model.block_out_channels", (32, 0)),
    ("model.layers_per_block", 0),
    ("model.attention_head_dim", 0),
    ("model.norm_num_groups", 5),  # 32 channels do not split into 5
    ("model.norm_num_groups", 0),
    ("model.dtype", "float8"),
    ("model.lora.rank", -1),
    ("model.lora.dropout", 1.0),
    ("model.lora.alpha", -1.0),
    ("model.lora.base_dtype", "int8", "model.lora.base_dtype"),
    ("autoencoder.kl_weight", -1.0),
    ("autoencoder.disc_weight", -0.5),
    ("autoencoder.disc_start", 1.5),
    ("autoencoder.disc_layers", 0),
    ("autoencoder.disc_channels", 0),
    ("autoencoder.eval_images", 1),
    ("autoencoder.scaling_factor", -1.0),
    ("autoencoder.shift_factor", NAN),
    ("autoencoder.block_out_channels", (0,)),
    ("autoencoder.norm_num_groups", 7),
    ("autoencoder.latent_channels", 0),
    ("autoencoder.reconstruction_loss", "l3"),
    ("diffusion.num_timesteps", 1),
    ("diffusion.num_timesteps", 0),
    ("diffusion.beta_start", -0.1),
    ("diffusion.beta_end", 1.5),
    ("diffusion.min_snr_gamma", -1.0),
    ("diffusion.cfg_dropout", 1.0),
    ("diffusion.cfg_dropout", -0.1),
    ("diffusion.logit_std", 0.0),
    ("diffusion.logit_mean", INF),
    ("sampling.sampler", "foo"),
    ("sampling.num_steps", 0),
    ("sampling.num_steps", 101),  # tiny: diffusion.num_timesteps = 100
    ("sampling.guidance_scale", -3.0),
    ("sampling.guidance_scale", NAN),
    ("sampling.guidance_interval", (0.8, 0.2)),
    ("sampling.guidance_interval", (0.0, 1.5)),
    ("sampling.guidance_interval", (0.5,)),
    ("sampling.eta", -0.5),
    ("sampling.samples_per_prompt", 0),
    ("sampling.chunk_size", 0),
    ("sampling.steps_offset", -1),
    ("sampling.steps_offset", 1),  # applies to "leading" spacing only
    ("sampling.clip_x0", -1.0),
    ("eval.num_samples", 0),
    ("eval.num_samples", 3),  # diversity needs 2 per prompt: 20
    ("eval.num_samples", 19),
    ("eval.chunk_size", 0),
    ("eval.num_clip_samples", 0),
    ("eval.inception_reference_samples", 1),
    ("eval.metrics", ("nope",)),
    ("eval.prompts_file", "/nonexistent/prompts.txt"),
    ("parallel.cpu_devices", -1),
    ("parallel.model_axis_size", -1),
    ("parallel.fsdp_min_size", -1),
    ("parallel.distributed", "sometimes"),
]


def _row_id(row):
  return f"{row[0]}={row[1]!r}"


@pytest.mark.parametrize("row", TINY_ROWS, ids=_row_id)
def test_tiny_config_refuses(row):
  key, value, named = (*row, row[0])[:3]
  message = _refused(config_checks.validate, _config(**{key: value}))
  assert named in message, message


@pytest.mark.parametrize("overrides,named", [
    # The 3-level MNIST UNet halves the image twice: a multiple of 4.
    ({"data.image_size": 30}, "data.image_size"),
    ({"data.image_size": 14}, "data.image_size"),
    # Linear betas must rise (0 = the schedule's default).
    ({"diffusion.schedule": "linear", "diffusion.beta_start": 0.03,
      "diffusion.beta_end": 0.01}, "diffusion.beta_start"),
    ({"diffusion.schedule": "linear", "diffusion.beta_start": 0.05},
     "diffusion.beta_start"),  # above the default end, 0.02
    ({"sampling.num_steps": 1001}, "sampling.num_steps"),
    ({"eval.num_samples": 15}, "eval.num_samples"),
], ids=lambda v: str(v))
def test_mnist_config_refuses(overrides, named):
  message = _refused(config_checks.validate, _config("mnist", **overrides))
  assert named in message, message


def test_latent_image_size_is_checked_against_the_autoencoder():
  """A latent run's pixels are not the UNet's: validate leaves the size to
  check_latent_size, called with the autoencoder's downsampling factor."""
  config = _config("mnist_latent", **{"data.image_size": 24})
  config_checks.validate(config)  # 24 is not a multiple of 4: latents
  assert config_checks.check_latent_size(_config("mnist_latent"), 4) == 8
  # 24 / 4 = 6x6 latents: the 3-level UNet cannot halve them twice.
  message = _refused(config_checks.check_latent_size, config, 4)
  assert "data.image_size=24" in message and "multiple of 16" in message
  message = _refused(config_checks.check_latent_size,
                     _config("mnist_latent", **{"data.image_size": 30}), 4)
  assert "image_size=30 does not divide" in message
  # The autoencoder run: its own downsampling (32 -> 16 -> 8).
  config_checks.validate_autoencoder(_config("mnist_latent", "autoencoder"))
  message = _refused(config_checks.validate_autoencoder, _config(
      "mnist_latent", "autoencoder", **{"data.image_size": 30}))
  assert "data.image_size=30" in message and "multiple of 4" in message
  message = _refused(config_checks.validate_autoencoder, _config(
      "mnist_latent", "autoencoder", **{"autoencoder.kl_weight": -1.0}))
  assert "autoencoder.kl_weight" in message


def test_messages_name_value_and_range():
  message = _refused(config_checks.validate,
                     _config(**{"optim.learning_rate": -1.0}))
  assert message.startswith("optim.learning_rate=-1.0 must be > 0 (a "
                            "finite number)"), message
  message = _refused(config_checks.validate,
                     _config(**{"sampling.guidance_scale": -3.0}))
  assert "sampling.guidance_scale=-3.0 must be >= 0" in message
  message = _refused(config_checks.validate,
                     _config(**{"sampling.sampler": "foo"}))
  for name in ("ddim", "ddpm", "dpmpp_2m"):
    assert name in message
  message = _refused(config_checks.validate, _config(**{"data.image_size": 27}))
  assert "multiple of 2" in message and "data.image_size=28" in message


def test_valid_values_pass():
  config_checks.validate(_config())
  config_checks.validate(_config(**{
      "optim.learning_rate": 1,  # an int for a float field
      "optim.grad_clip_norm": 0.0,  # off
      "optim.ema_decay": 0.0,
      "optim.warmup_steps": 0,
      "training.keep_checkpoints": None,  # keep all
      "training.seed": -7,
      "sampling.guidance_scale": 0.0,  # unconditional
      "sampling.guidance_interval": [0.2, 0.8],
      "sampling.num_steps": 100,
      "sampling.eta": 1.0,
      "sampling.clip_x0": 2.0,
      "diffusion.schedule": "linear",
      "diffusion.beta_start": 1e-4,
      "diffusion.beta_end": 0.02,
      "eval.num_samples": 20,
      "data.image_size": 32,
  }))
  config_checks.check_sampling_flags(
      num_samples=1, sampler="ddpm", steps=1, guidance_scale=1.0, eta=0.0,
      guidance_interval=["0.2", "0.8"], chunk_size=1, lora_scale=-0.5,
      step=0, seed=3, metrics=["fid_mnist"])


def _shipped_configs():
  """(name, kind) of every configs/*.py, default.py (the neutral template
  every experiment file starts from) included."""
  kinds = {"mnist_latent": (None, "autoencoder"), "sd_finetune": (None, "lora")}
  names = sorted(os.path.basename(p)[:-3] for p in glob.glob(
      os.path.join(helpers.ROOT, "configs", "*.py")))
  return [(n, k) for n in names if n != "__init__"
          for k in kinds.get(n, (None,))]


@pytest.mark.parametrize("name,kind", _shipped_configs())
def test_every_shipped_config_validates(name, kind):
  config = _config(name, kind)
  start = time.perf_counter()
  config_checks.validate(config)
  if kind == "autoencoder":
    config_checks.validate_autoencoder(config)
  assert time.perf_counter() - start < 1.0


# --- The evaluator's minimums --------------------------------------------------


def test_evaluator_names_each_metrics_minimum():
  config = _config(**{"eval.num_samples": 1})
  message = _refused(evaluator_lib.Evaluator, config)
  assert message.startswith("eval.num_samples=1 is too few"), message
  for part in ("prompt_accuracy needs >= 10", "fid_mnist needs >= 2",
               "diversity needs >= 20", "eval.num_samples >= 20"):
    assert part in message, message
  message = _refused(evaluator_lib.Evaluator,
                     _config(**{"eval.num_samples": 12}))
  assert "diversity needs >= 20" in message
  assert "fid_mnist" not in message and "prompt_accuracy" not in message
  evaluator_lib.Evaluator(_config())  # tiny's 20 is enough


def test_evaluator_counts_the_prompts_file(tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_text("a photograph of the number 1\n\n"
                  "a photograph of the number 2\nthe number 3\n")
  config = _config(**{"eval.prompts_file": str(path), "eval.num_samples": 6,
                      "eval.metrics": ("diversity", "prompt_accuracy")})
  evaluator_lib.Evaluator(config)  # 3 prompts: diversity needs 6
  config.eval.num_samples = 5
  message = _refused(evaluator_lib.Evaluator, config)
  assert "diversity needs >= 6" in message and "3 prompts" in message
  # Metrics that judge any images: 2 for a covariance, 1 for CLIP.
  config = _config("imagefolder", **{"eval.num_samples": 1})
  message = _refused(config_checks.validate, config)
  assert "fid_inception needs >= 2" in message
  assert "clip_score" not in message


# --- jaxsd.commands.sample / jaxsd.commands.evaluate flags -----------------------------------------


SAMPLE_ROWS = [
    ({"num_samples": 0}, "--num_samples"),
    ({"num_samples": 0}, "num_samples must be >= 1"),
    ({"steps": 0}, "--steps"),
    ({"steps": -2}, "steps must be >= 1"),
    ({"guidance_scale": -3.0}, "--guidance_scale=-3.0"),
    ({"guidance_scale": NAN}, "--guidance_scale"),
    ({"eta": -1.0}, "--eta"),
    ({"chunk_size": 0}, "--chunk_size"),
    ({"lora_scale": INF}, "--lora_scale"),
    ({"guidance_interval": ["0.9", "0.1"]}, "--guidance_interval"),
    ({"guidance_interval": ["a", "b"]}, "--guidance_interval"),
    ({"guidance_interval": ["0.5"]}, "--guidance_interval"),
    ({"sampler": "euler"}, "--sampler"),
    ({"sampler": "euler"}, "Unknown sampler"),
    ({"step": -1}, "--step"),
    ({"seed": 2**64}, "--seed"),
]


@pytest.mark.parametrize("kwargs,named", SAMPLE_ROWS, ids=str)
def test_sample_flags_refused_before_the_workdir(kwargs, named):
  kwargs = {"num_samples": 1, **kwargs}
  message = _refused(sample.generate_for_prompts, NOWHERE, ["a 3"], **kwargs)
  assert named in message, message


EVALUATE_ROWS = [
    ({"num_samples": 0}, "--num_samples"),
    ({"sampler_steps": 0}, "--steps"),
    ({"guidance_scale": -3.0}, "--guidance_scale=-3.0"),
    ({"guidance_interval": (0.5, 0.5)}, "--guidance_interval"),
    ({"sampler": "foo"}, "--sampler"),
    ({"metrics": ["nope"]}, "--metrics"),
    ({"metrics": []}, "--metrics"),
    ({"steps": [-1]}, "--step"),
]


@pytest.mark.parametrize("kwargs,named", EVALUATE_ROWS, ids=str)
def test_evaluate_flags_refused_before_the_workdir(kwargs, named):
  message = _refused(evaluate.evaluate_checkpoints, NOWHERE, **kwargs)
  assert named in message, message


@pytest.fixture
def config_only_workdir(tmp_path):
  """A workdir with the tiny run's config.json and no checkpoint: what
  needs the run's config is checked before any checkpoint is looked for."""
  with open(tmp_path / "config.json", "w") as f:
    json.dump(json.loads(_config().to_json()), f)
  return str(tmp_path)


def test_flags_against_the_runs_config(config_only_workdir):
  message = _refused(sample.generate_for_prompts, config_only_workdir,
                     ["a 3"], num_samples=1, steps=101)
  assert "--steps=101" in message and "num_timesteps=100" in message
  message = _refused(evaluate.evaluate_checkpoints, config_only_workdir,
                     sampler_steps=500)
  assert "--steps=500" in message
  message = _refused(evaluate.evaluate_checkpoints, config_only_workdir,
                     num_samples=3)
  assert message.startswith("--num_samples=3 is too few"), message
  assert "diversity needs >= 20" in message and "fid_mnist" not in message
  message = _refused(evaluate.evaluate_checkpoints, config_only_workdir,
                     num_samples=1, metrics=["fid_mnist"])
  assert "fid_mnist needs >= 2" in message
  # Enough samples: on to the checkpoints, of which there are none.
  with pytest.raises(FileNotFoundError):
    evaluate.evaluate_checkpoints(config_only_workdir, num_samples=2,
                                  metrics=["fid_mnist"])
