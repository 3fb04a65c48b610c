"""Training throughput of a config's model: jaxsd's UNet against diffusers'
Flax UNet and against the original PyTorch stack.

python benchmarks/bench_train.py --config=configs/mnist.py [--windows=5]
    [--steps_per_window=5] [--skip_diffusers] [--skip_torch]

For each implementation (the config's UNet, then diffusers' Flax UNet at the
same architecture) builds the real train step (text encoder, loss, AdamW,
EMA, batch sharded over all devices), times `windows` windows of
`steps_per_window` steps after a warm-up, and prints one JSON object:
images_per_second (median over windows), compile_seconds (first call minus a
steady step), peak_memory_gb (the process's peak RSS on CPU, the device's peak
bytes in use on GPU), the same for diffusers, and speedup_vs_diffusers.
diffusers runs as its users get it, with XLA's default flags; where those
differ from the flags `import jaxsd` sets (jaxsd.xla_flags), it runs a second
time with jaxsd's flags (diffusers_same_flags_images_per_second,
speedup_vs_diffusers_same_flags), which separates the UNet's own speed from
the XLA setting. Every child reports the xla_flags it ran with.

The PyTorch baseline (`torch_*` keys and speedup_vs_torch) is the stack the
project replaces: diffusers' PyTorch UNet2DConditionModel and transformers'
PyTorch CLIPTextModel built from the same config values, trained with the same
step (random timesteps and noise, empty-prompt dropout, MSE on the target,
global-norm clipping, AdamW over UNet and text parameters, EMA) in eager
mode on the CPU with torch.set_num_threads(os.cpu_count()). Config features
the PyTorch step lacks (model.pooled_text_embedding, min-SNR weighting,
non-uniform timestep sampling) are left out there and listed in
`torch_note`; diffusers' Flax UNet likewise runs without
model.pooled_text_embedding (`diffusers_note`).

Each implementation runs in a subprocess so its memory and compile cache are
its own. The JAX children time the step that jaxsd.diffusion.setup.TrainSetup builds
(benchmarks/train_timing.py, shared with bench_fast_paths.py).
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

import train_timing  # benchmarks/, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS


def _define_flags():
  config_flags.DEFINE_config_file("config", "configs/mnist.py", "Config file.")
  flags.DEFINE_integer("windows", 5, "Timed windows (median reported).")
  flags.DEFINE_integer("steps_per_window", 5, "Train steps per window.")
  flags.DEFINE_bool("skip_diffusers", False, "Skip diffusers' Flax UNet.")
  flags.DEFINE_bool("skip_torch", False, "Skip the PyTorch baseline.")
  flags.DEFINE_string("implementation", None, "Internal: measure this "
                      "implementation (a UNet implementation or 'torch') in "
                      "this process and print its figures.")


def _peak_rss_gb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# CLIP's tokenizer: 49406 = <|startoftext|>, 49407 = <|endoftext|> (padding).
_BOS, _EOS = 49406, 49407
# jaxsd schedule names -> diffusers' DDPMScheduler beta_schedule.
_TORCH_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear",
                         "cosine": "squaredcos_cap_v2"}


def _torch_note(config) -> str:
  missing = []
  pooled = config.model.pooled_text_embedding
  if pooled:
    missing.append(f"model.pooled_text_embedding={pooled!r} (the jaxsd UNet's "
                   "projection of the pooled text encoding added to the time "
                   "embedding)")
  sampling = config.diffusion.get("timestep_sampling", "uniform")
  if sampling != "uniform":
    missing.append(f"diffusion.timestep_sampling={sampling!r} (timesteps "
                   "drawn uniformly)")
  if config.diffusion.min_snr_gamma > 0:
    missing.append("diffusion.min_snr_gamma loss weighting")
  if config.optim.grad_accum_steps > 1:
    missing.append("optim.grad_accum_steps")
  note = ("eager PyTorch (no torch.compile), float32, one step per call, "
          "constant learning rate")
  if missing:
    note += "; ran without " + ", ".join(missing)
  return note


def _tuple_if_list(value):
  return tuple(value) if isinstance(value, (list, tuple)) else value


def _torch_models(config):
  """diffusers' PyTorch UNet2DConditionModel and transformers' PyTorch
  CLIPTextModel at the config's architecture."""
  # Keep TensorFlow and Flax out of this process (RSS, import time).
  for name in ("USE_TF", "USE_FLAX", "USE_JAX"):
    os.environ.setdefault(name, "0")
  import diffusers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  diffusers.utils.logging.set_verbosity_error()
  # The fields of jaxsd.models.architecture_kwargs, spelled out: importing
  # jaxsd.models would load JAX into this process and into its memory figure.
  m, text = config.model, config.text
  unet = diffusers.UNet2DConditionModel(
      sample_size=config.data.image_size, in_channels=m.in_channels,
      out_channels=m.out_channels,
      block_out_channels=tuple(m.block_out_channels),
      down_block_types=tuple(m.down_block_types),
      up_block_types=tuple(m.up_block_types),
      layers_per_block=m.layers_per_block,
      attention_head_dim=_tuple_if_list(m.attention_head_dim),
      only_cross_attention=_tuple_if_list(m.only_cross_attention),
      use_linear_projection=m.use_linear_projection,
      cross_attention_dim=text.hidden_size,
      norm_num_groups=m.norm_num_groups)
  encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=49408, hidden_size=text.hidden_size,
      num_hidden_layers=text.num_layers, num_attention_heads=text.num_heads,
      intermediate_size=text.intermediate_size,
      max_position_embeddings=text.max_length,
      bos_token_id=_BOS, eos_token_id=_EOS, pad_token_id=_EOS))
  scheduler = diffusers.DDPMScheduler(
      num_train_timesteps=config.diffusion.num_timesteps,
      beta_schedule=_TORCH_BETA_SCHEDULES[config.diffusion.schedule],
      prediction_type=config.diffusion.prediction_type)
  return unet, encoder, scheduler


def _torch_ids(batch: int, length: int):
  """A caption-like batch ([BOS, words, EOS, padding]) and the empty prompt."""
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(0)
  ids = torch.full((batch, length), _EOS, dtype=torch.long)
  ids[:, 0] = _BOS
  words = min(8, length - 2)
  ids[:, 1:1 + words] = torch.randint(0, _BOS, (batch, words), generator=gen)
  uncond = torch.full((1, length), _EOS, dtype=torch.long)
  uncond[0, 0] = _BOS
  return ids, uncond


def measure_torch(config, windows: int, steps_per_window: int):
  """Figures of the PyTorch (diffusers + transformers) train step."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  unet, encoder, scheduler = _torch_models(config)
  unet.train()
  encoder.train()
  params = list(unet.parameters()) + list(encoder.parameters())
  ocfg = config.optim
  opt = torch.optim.AdamW(params, lr=ocfg.learning_rate,
                          betas=(ocfg.b1, ocfg.b2), eps=ocfg.eps,
                          weight_decay=ocfg.weight_decay, foreach=True)
  ema = [p.detach().clone() for p in params]
  b, size = config.training.batch_size, config.data.image_size
  images = torch.rand(b, config.model.in_channels, size, size) * 2 - 1
  ids, uncond = _torch_ids(b, config.text.max_length)
  num_timesteps = config.diffusion.num_timesteps
  counter = {"step": 0}

  def train_step():
    t = torch.randint(0, num_timesteps, (b,))
    noise = torch.randn_like(images)
    drop = torch.rand(b) < config.diffusion.cfg_dropout
    context = encoder(torch.where(drop[:, None], uncond, ids)).last_hidden_state
    x_t = scheduler.add_noise(images, noise, t)
    out = unet(x_t, t, context).sample
    target = (noise if config.diffusion.prediction_type == "epsilon"
              else scheduler.get_velocity(images, noise, t))
    loss = F.mse_loss(out, target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if ocfg.grad_clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(params, ocfg.grad_clip_norm, foreach=True)
    opt.step()
    step = counter["step"]
    decay = min(ocfg.ema_decay, (1.0 + step) / (10.0 + step))
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1.0 - decay)  # pylint: disable=protected-access
    counter["step"] += 1
    return loss

  start = time.perf_counter()
  train_step()
  first = time.perf_counter() - start
  k = config.training.steps_per_call
  steps = max(1, steps_per_window // k) * k  # as many as the JAX child
  times = []
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(steps):
      loss = train_step()
    loss.item()
    times.append((time.perf_counter() - start) / steps)
  med = statistics.median(times)
  return {"implementation": "torch",
          "images_per_second": b / med,
          "seconds_per_step_median": med,
          "seconds_per_step_windows": times,
          "compile_seconds": max(first - med, 0.0),
          "peak_memory_gb": _peak_rss_gb(),
          "params": sum(p.numel() for p in params),
          "torch_version": torch.__version__,
          "torch_threads": torch.get_num_threads(),
          "torch_note": _torch_note(config)}


def _run_child(config_path, implementation, extra, xla_defaults=False):
  """Figures of one implementation, measured in a fresh process;
  xla_defaults: without the XLA flags `import jaxsd` adds (jaxsd.xla_flags),
  i.e. XLA as a plain JAX user gets it."""
  env = dict(os.environ)
  if xla_defaults:
    env["JAXSD_XLA_DEFAULTS"] = "1"
  cmd = [sys.executable, os.path.abspath(__file__), f"--config={config_path}",
         f"--implementation={implementation}",
         f"--windows={FLAGS.windows}",
         f"--steps_per_window={FLAGS.steps_per_window}", *extra]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       check=False, env=env)
  if out.returncode:
    raise RuntimeError(f"{implementation} benchmark failed:\n"
                       f"{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  if FLAGS.implementation:
    config = FLAGS.config
    if FLAGS.implementation == "torch":
      result = measure_torch(config, FLAGS.windows, FLAGS.steps_per_window)
    else:
      config.model.implementation = FLAGS.implementation
      note = {}
      if (FLAGS.implementation == "diffusers"
          and config.model.pooled_text_embedding):
        # A jaxsd UNet feature diffusers' UNet cannot build.
        pooled = config.model.pooled_text_embedding
        config.model.pooled_text_embedding = type(pooled)()  # off: "" or False
        note = {"note": f"ran without model.pooled_text_embedding={pooled!r}"}
      result = {**train_timing.measure(config, FLAGS.windows,
                                          FLAGS.steps_per_window),
                **note}
    print(json.dumps(result))
    return
  config_path = config_flags.get_config_filename(FLAGS["config"])
  extra = [a for a in sys.argv[1:] if a.startswith("--config.")]
  del argv
  ours = _run_child(config_path, FLAGS.config.model.implementation, extra)
  result = {"config": config_path, "overrides": extra, **ours}
  if not FLAGS.skip_diffusers and ours["implementation"] != "diffusers":
    # As its users run it: XLA's default flags.
    theirs = _run_child(config_path, "diffusers", extra, xla_defaults=True)
    result.update({
        "diffusers_images_per_second": theirs["images_per_second"],
        "diffusers_compile_seconds": theirs["compile_seconds"],
        "diffusers_peak_memory_gb": theirs["peak_memory_gb"],
        "diffusers_xla_flags": theirs["xla_flags"],
        **({"diffusers_note": theirs["note"]} if "note" in theirs else {}),
        "speedup_vs_diffusers": ours["images_per_second"]
                                / theirs["images_per_second"]})
    if theirs["xla_flags"] != ours["xla_flags"]:
      # And with jaxsd's XLA flags, which separates the UNet's own speed from
      # the XLA settings.
      same = _run_child(config_path, "diffusers", extra)
      result.update({
          "diffusers_same_flags_images_per_second": same["images_per_second"],
          "speedup_vs_diffusers_same_flags": ours["images_per_second"]
                                             / same["images_per_second"]})
  if not FLAGS.skip_torch:
    pt = _run_child(config_path, "torch", extra)
    result.update({
        "torch_images_per_second": pt["images_per_second"],
        "torch_compile_seconds": pt["compile_seconds"],
        "torch_peak_memory_gb": pt["peak_memory_gb"],
        "torch_params": pt["params"],
        "torch_note": pt["torch_note"],
        "speedup_vs_torch": ours["images_per_second"]
                            / pt["images_per_second"]})
  result["config_values"] = FLAGS.config.to_dict()
  print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
