"""Sampling from a trained run: prompts in, images (and PNG files) out.

- `read_prompts(prompts, prompts_file)`: the prompts of the command line.
- `run_prompts(workdir)`: the run's own sample-grid prompts (the default).
- `generate_for_prompts(workdir, prompts, ...)`: images [N, H, W, C] in
  [-1, 1] from a checkpoint of the run (its EMA params by default), at the
  run's sampling.height x sampling.width or any other multiple of its
  downsampling.
- `write_samples(images, prompts, num_samples, out)`: the PNG grid (a row
  per prompt) and optionally each image.
- `sample_run(workdir, prompts, out, ...)`: all three, what `jaxsd-sample`
  does.
"""
import os
from typing import List, Optional, Sequence, Tuple

from absl import logging
import jax

from jaxsd.errors import ConfigError


def read_prompts(prompts: Sequence[str], prompts_file: Optional[str]
                 ) -> List[str]:
  """`prompts` then the non-blank lines of `prompts_file` (if given)."""
  out = list(prompts)
  if prompts_file:
    if not os.path.isfile(prompts_file):
      raise ConfigError(f"--prompts_file={prompts_file!r} does not exist; "
                        "give a file with one prompt a line.")
    with open(prompts_file) as f:
      out += [line.rstrip("\n") for line in f if line.strip()]
  if not out:
    raise ConfigError("No prompts: pass --prompt (repeatable) or "
                      "--prompts_file with one prompt a line.")
  return out


def run_prompts(workdir: str, step: Optional[int] = None) -> List[str]:
  """The prompts of the run's own sample grid, as training draws it
  (diffusion/task.py grid_prompts): its sampling.prompts, else the first
  distinct captions of its training data."""
  from jaxsd.checkpointing import run_config  # pylint: disable=g-import-not-at-top
  from jaxsd.data import pipeline as data_pipeline  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import task  # pylint: disable=g-import-not-at-top
  config = run_config.load_run_config(workdir, step)
  source, where = None, "its sampling.prompts"
  if not config.sampling.prompts:
    where = f"the first captions of its data (data.source={config.data.source})"
    try:
      source = data_pipeline.make_source(config)
    except (OSError, ValueError) as e:
      raise ConfigError(
          f"No --prompt given, and the run's grid prompts are the captions "
          f"of its data (data.source={config.data.source!r}), which cannot "
          f"be read here ({type(e).__name__}: {str(e).splitlines()[0]}); "
          "pass --prompt (repeatable) or --prompts_file.") from None
  prompts = task.grid_prompts(config, source)
  if not prompts:
    raise ConfigError("No --prompt given, and the run has no grid prompts "
                      "(its data has no captions); pass --prompt or "
                      "--prompts_file.")
  logging.info("No --prompt: sampling the run's own grid prompts (%s): %s",
               where, prompts)
  return prompts


def generate_for_prompts(workdir: str, prompts: Sequence[str], *,
                         num_samples: int, seed: int = 0,
                         sampler: Optional[str] = None,
                         steps: Optional[int] = None,
                         guidance_scale: Optional[float] = None,
                         eta: Optional[float] = None,
                         guidance_interval=None,
                         step: Optional[int] = None, use_ema: bool = True,
                         chunk_size: Optional[int] = None,
                         lora_scale: float = 1.0,
                         height: Optional[int] = None,
                         width: Optional[int] = None,
                         clip_x0: Optional[float] = None,
                         timestep_spacing: Optional[str] = None):
  """Images [len(prompts) * num_samples, H, W, C] in [-1, 1], prompt-major,
  and the checkpoint step they came from. A LoRA run's adapters are merged
  into its base at lora_scale. height, width: pixels (default: the run's
  sampling.height / sampling.width, whose 0 is data.image_size). clip_x0:
  a bound c (0 = off) instead of the run's sampling.clip_x0;
  timestep_spacing: instead of the run's ("leading" with steps_offset 1)."""
  from jaxsd import config_checks  # pylint: disable=g-import-not-at-top
  # The flags first, before the workdir is read or anything built.
  config_checks.check_sampling_flags(
      num_samples=num_samples, sampler=sampler, steps=steps,
      guidance_scale=guidance_scale, eta=eta,
      guidance_interval=guidance_interval, chunk_size=chunk_size,
      lora_scale=lora_scale, step=step, seed=seed, height=height,
      width=width, clip_x0=clip_x0, timestep_spacing=timestep_spacing)
  from jaxsd.checkpointing import run_config  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import setup as build  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import generate  # pylint: disable=g-import-not-at-top
  from jaxsd import parallel  # pylint: disable=g-import-not-at-top
  from jaxsd.models import checks as model_checks  # pylint: disable=g-import-not-at-top
  # The checkpoint's config, read once: the flags are checked against the
  # run's schedule and downsampling (a latent run's autoencoder loaded for
  # its factor) before any checkpoint is restored.
  config = run_config.load_run_config(workdir, step)
  if timestep_spacing is not None:  # the checks and the Generator read it
    with config.unlocked():
      config.sampling.timestep_spacing = timestep_spacing
      config.sampling.steps_offset = 1 if timestep_spacing == "leading" else 0
  # A pixel run's --height/--width now, before the tokenizer and models
  # load (seconds); a latent run's need its autoencoder's factor, loaded
  # with the components.
  sizes = dict(height=height, width=width)
  latent = model_checks.is_latent_run(config)
  config_checks.check_flags_against_run(config, steps=steps,
                                        **({} if latent else sizes))
  comps = build.build_components(config)
  if latent:
    config_checks.check_flags_against_run(
        config, autoencoder_factor=comps.autoencoder_factor, **sizes)
  mesh = parallel.make_mesh()
  config, comps, params, step = build.restore_for_inference(
      workdir, mesh, step=step, use_ema=use_ema, lora_scale=lora_scale,
      config=config, components=comps)
  generator = generate.Generator.from_config(
      comps, mesh, config.sampling, chunk_size=chunk_size, sampler=sampler,
      num_steps=steps, guidance_scale=guidance_scale, eta=eta,
      guidance_interval=guidance_interval, height=height, width=width,
      clip_x0=None if clip_x0 is None else float(clip_x0))
  all_prompts = [p for p in prompts for _ in range(num_samples)]
  images = generator(params, all_prompts, jax.random.key(seed))
  return images, step


def _slug(text: str) -> str:
  keep = "".join(c if c.isalnum() else "_" for c in text.strip())
  return keep[:60] or "empty"


def write_samples(images, prompts: Sequence[str], num_samples: int,
                  out: str, save_individual: bool = False) -> List[str]:
  """Writes `out`, a PNG grid with a row per prompt, and with
  save_individual each image as <out stem>_<prompt>_<i>.png beside it.

  images: [len(prompts) * num_samples, H, W, C] in [-1, 1], prompt-major.
  Returns the paths written (the grid first).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from jaxsd.tracking import images as images_lib  # pylint: disable=g-import-not-at-top
  grid = images_lib.prompt_rows_grid(images, prompts)
  images_lib.save_png_atomic(grid, out)
  written = [out]
  if save_individual:
    stem = os.path.splitext(out)[0]
    for i, img in enumerate(images_lib.to_uint8(images)):
      prompt = prompts[i // num_samples]
      name = f"{stem}_{_slug(prompt)}_{i % num_samples:03d}.png"
      mode = "L" if img.shape[-1] == 1 else "RGB"
      images_lib.save_png_atomic(
          Image.fromarray(img[..., 0] if mode == "L" else img, mode), name)
      written.append(name)
  return written


def sample_run(workdir: str, prompts: Sequence[str], out: str, *,
               prompts_file: Optional[str] = None, num_samples: int,
               save_individual: bool = False, **generate_kwargs
               ) -> Optional[Tuple[List[str], int]]:
  """`jaxsd-sample`: joins the other processes of a multi-process launch,
  samples `num_samples` images per prompt (`prompts`, then the lines of
  `prompts_file`; neither: the run's grid prompts, `run_prompts`) from the run in `workdir` (`generate_for_prompts`'s
  keywords) and, on process 0, writes them (`write_samples`).

  Returns (the prompts, the checkpoint step sampled) on process 0, None on
  the others.
  """
  from jaxsd import parallel  # pylint: disable=g-import-not-at-top
  parallel.maybe_initialize_distributed("auto")
  if prompts or prompts_file:
    prompts = read_prompts(prompts, prompts_file)
  else:  # the run's own sample-grid prompts
    prompts = run_prompts(workdir, generate_kwargs.get("step"))
  images, step = generate_for_prompts(workdir, prompts,
                                      num_samples=num_samples,
                                      **generate_kwargs)
  if jax.process_index() != 0:
    return None
  write_samples(images, prompts, num_samples, out, save_individual)
  logging.info("Wrote %d images of checkpoint step %d to %s", len(images),
               step, out)
  return prompts, step
