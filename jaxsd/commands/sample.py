"""Sample images from a trained run's checkpoint.

jaxsd-sample --workdir=runs/mnist \
    --prompt="a photograph of the number 7" --num_samples=16 \
    --sampler=dpmpp_2m --steps=25 --guidance_scale=3.0 --seed=0 \
    --height=32 --width=64 --out=samples.png
"""
from absl import app
from absl import flags

from jaxsd.commands import cli

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string("workdir", None, "Training workdir holding "
                      "checkpoints/ and config.json.")
  flags.DEFINE_multi_string("prompt", [], "A prompt; repeat for several. "
                            "An empty prompt samples unconditionally. "
                            "Default (no --prompt or --prompts_file): the "
                            "run's own sample-grid prompts.")
  flags.DEFINE_string("prompts_file", None, "A file with one prompt a line.")
  flags.DEFINE_integer("num_samples", 16, "Images per prompt.")
  cli.define_sampler_flags()
  flags.adopt_module_key_flags(cli)  # --help lists them as this command's
  flags.DEFINE_float("eta", None, "DDIM eta (0 = deterministic).")
  flags.DEFINE_float("clip_x0", None, "Clip the x0 estimate to [-c, c] at "
                     "every step, latent runs too; 0 = off (default: the "
                     "run's sampling.clip_x0).")
  flags.DEFINE_string("timestep_spacing", None, "trailing | leading | "
                      "linspace: sampling timesteps (default: the run's "
                      "sampling.timestep_spacing; leading uses steps_offset "
                      "1 as SD).")
  flags.DEFINE_string("out", "samples.png", "PNG grid to write.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_bool("save_individual", False, "Also write each image as "
                    "OUT_DIR/<out stem>_<prompt>_<i>.png.")
  flags.DEFINE_integer("chunk_size", None, "Images per jitted call "
                       "(default: the run's sampling.chunk_size).")
  flags.DEFINE_float("lora_scale", 1.0, "LoRA runs: the adapters' weight "
                     "when merged into the base (0 = the base alone).")
  flags.DEFINE_integer("height", None, "Image height in pixels, a multiple "
                       "of the model's downsampling (default: the run's "
                       "sampling.height, else data.image_size).")
  flags.DEFINE_integer("width", None, "Image width in pixels, as --height "
                       "(default: the run's sampling.width, else "
                       "data.image_size).")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from jaxsd.diffusion import sample_run  # pylint: disable=g-import-not-at-top
  done = sample_run.sample_run(
      FLAGS.workdir, FLAGS.prompt, FLAGS.out, prompts_file=FLAGS.prompts_file,
      num_samples=FLAGS.num_samples, save_individual=FLAGS.save_individual,
      seed=FLAGS.seed, sampler=FLAGS.sampler, steps=FLAGS.steps,
      guidance_scale=FLAGS.guidance_scale, eta=FLAGS.eta, step=FLAGS.step,
      guidance_interval=FLAGS.guidance_interval, use_ema=FLAGS.use_ema,
      chunk_size=FLAGS.chunk_size, lora_scale=FLAGS.lora_scale,
      height=FLAGS.height, width=FLAGS.width, clip_x0=FLAGS.clip_x0,
      timestep_spacing=FLAGS.timestep_spacing)
  if done:
    prompts, step = done
    print(f"Wrote {FLAGS.out} ({len(prompts)} prompts x {FLAGS.num_samples}, "
          f"checkpoint step {step})")


def run():
  """The `jaxsd-sample` command."""
  cli.run(main, _define_flags)


if __name__ == "__main__":
  run()
