"""Sample images from a trained run's checkpoint.

jaxsd-sample --workdir=runs/mnist \
    --prompt="a photograph of the number 7" --num_samples=16 \
    --sampler=dpmpp_2m --steps=25 --guidance_scale=3.0 --seed=0 \
    --out=samples.png
"""
import os
from typing import List, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax

from jaxsd.commands import cli

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string("workdir", None, "Training workdir holding "
                      "checkpoints/ and config.json.")
  flags.DEFINE_multi_string("prompt", [], "A prompt; repeat for several. "
                            "An empty prompt samples unconditionally.")
  flags.DEFINE_string("prompts_file", None, "A file with one prompt a line.")
  flags.DEFINE_integer("num_samples", 16, "Images per prompt.")
  cli.define_sampler_flags()
  flags.adopt_module_key_flags(cli)  # --help lists them as this command's
  flags.DEFINE_float("eta", None, "DDIM eta (0 = deterministic).")
  flags.DEFINE_string("out", "samples.png", "PNG grid to write.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_bool("save_individual", False, "Also write each image as "
                    "OUT_DIR/<out stem>_<prompt>_<i>.png.")
  flags.DEFINE_integer("chunk_size", None, "Images per jitted call "
                       "(default: the run's sampling.chunk_size).")
  flags.DEFINE_float("lora_scale", 1.0, "LoRA runs: the adapters' weight "
                     "when merged into the base (0 = the base alone).")
  flags.mark_flags_as_required(["workdir"])


def read_prompts(prompts: Sequence[str], prompts_file: Optional[str]
                 ) -> List[str]:
  out = list(prompts)
  if prompts_file:
    with open(prompts_file) as f:
      out += [line.rstrip("\n") for line in f if line.strip()]
  if not out:
    raise ValueError("No prompts: pass --prompt (repeatable) or "
                     "--prompts_file with one prompt a line.")
  return out


def generate_for_prompts(workdir: str, prompts: Sequence[str], *,
                         num_samples: int, seed: int = 0,
                         sampler: Optional[str] = None,
                         steps: Optional[int] = None,
                         guidance_scale: Optional[float] = None,
                         eta: Optional[float] = None,
                         guidance_interval=None,
                         step: Optional[int] = None, use_ema: bool = True,
                         chunk_size: Optional[int] = None,
                         lora_scale: float = 1.0):
  """Images [len(prompts) * num_samples, H, W, C] in [-1, 1], prompt-major,
  and the checkpoint step they came from. A LoRA run's adapters are merged
  into its base at lora_scale."""
  from jaxsd import config_checks  # pylint: disable=g-import-not-at-top
  # The flags first, before the workdir is read or anything built.
  config_checks.check_sampling_flags(
      num_samples=num_samples, sampler=sampler, steps=steps,
      guidance_scale=guidance_scale, eta=eta,
      guidance_interval=guidance_interval, chunk_size=chunk_size,
      lora_scale=lora_scale, step=step, seed=seed)
  from jaxsd.diffusion import setup as build  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import generate  # pylint: disable=g-import-not-at-top
  from jaxsd import parallel  # pylint: disable=g-import-not-at-top
  # The checkpoint's config, read once: the flags are checked against the
  # run's schedule before anything is restored.
  config = build.load_run_config(workdir, step)
  config_checks.check_flags_against_run(config, steps=steps)
  mesh = parallel.make_mesh()
  config, comps, params, step = build.restore_for_inference(
      workdir, mesh, step=step, use_ema=use_ema, lora_scale=lora_scale,
      config=config)
  generator = generate.Generator.from_config(
      comps, mesh, config.sampling, chunk_size=chunk_size, sampler=sampler,
      num_steps=steps, guidance_scale=guidance_scale, eta=eta,
      guidance_interval=guidance_interval)
  all_prompts = [p for p in prompts for _ in range(num_samples)]
  images = generator(params, all_prompts, jax.random.key(seed))
  return images, step


def _slug(text: str) -> str:
  keep = "".join(c if c.isalnum() else "_" for c in text.strip())
  return keep[:60] or "empty"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from jaxsd.tracking import images as images_lib  # pylint: disable=g-import-not-at-top
  from jaxsd import parallel  # pylint: disable=g-import-not-at-top
  parallel.maybe_initialize_distributed("auto")
  prompts = read_prompts(FLAGS.prompt, FLAGS.prompts_file)
  images, step = generate_for_prompts(
      FLAGS.workdir, prompts, num_samples=FLAGS.num_samples, seed=FLAGS.seed,
      sampler=FLAGS.sampler, steps=FLAGS.steps,
      guidance_scale=FLAGS.guidance_scale, eta=FLAGS.eta, step=FLAGS.step,
      guidance_interval=FLAGS.guidance_interval,
      use_ema=FLAGS.use_ema, chunk_size=FLAGS.chunk_size,
      lora_scale=FLAGS.lora_scale)
  if jax.process_index() != 0:
    return
  grid = images_lib.prompt_rows_grid(images, prompts)
  images_lib.save_png_atomic(grid, FLAGS.out)
  if FLAGS.save_individual:
    stem = os.path.splitext(FLAGS.out)[0]
    pixels = images_lib.to_uint8(images)
    for i, img in enumerate(pixels):
      prompt = prompts[i // FLAGS.num_samples]
      name = f"{stem}_{_slug(prompt)}_{i % FLAGS.num_samples:03d}.png"
      mode = "L" if img.shape[-1] == 1 else "RGB"
      from PIL import Image  # pylint: disable=g-import-not-at-top
      images_lib.save_png_atomic(
          Image.fromarray(img[..., 0] if mode == "L" else img, mode), name)
  logging.info("Wrote %d images of checkpoint step %d to %s", len(images),
               step, FLAGS.out)
  print(f"Wrote {FLAGS.out} ({len(prompts)} prompts x {FLAGS.num_samples}, "
        f"checkpoint step {step})")


def run():
  """The `jaxsd-sample` command (`jaxsd-sample`)."""
  cli.run(main, _define_flags)


if __name__ == "__main__":
  run()
